"""The prepare stage's tokenized output: splits, statistics, invalid rows dropped or refused, the cache key."""

import json

import pytest
from datasets import load_from_disk

from tuneflow.demo import build as build_assets
from tasks.prepare import cache_key
from tuneflow.config import TuneflowConfig
from tuneflow.data.formats import DatasetError
from tuneflow.data.prepare import build
from tuneflow.results import DownloadResult, SourceRef


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny"), n_rows=30)["model"]


def _setup(model_dir, data_file, **prep):
    cfg = TuneflowConfig.model_validate({
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"name_or_path": str(data_file), "eval_size": 2},
        "prep": {"cutoff_len": 128, **prep},
    })
    fetched = DownloadResult(
        model=SourceRef(kind="model", name=str(model_dir), revision="m1", local_path=str(model_dir)),
        dataset=SourceRef(kind="dataset", name=str(data_file), revision="d1", local_path=str(data_file)),
        mlflow_run_id="-",
    )
    return cfg, fetched


def _rows(n_good, n_bad):
    good = [{"instruction": f"Add {i} and 1.", "output": f"{i} plus 1 is {i + 1}."} for i in range(n_good)]
    return good + [{"instruction": "no answer"}] * n_bad


def test_splits_and_statistics(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(10, 0)))
    cfg, fetched = _setup(model_dir, data)
    stats = build(cfg, model_dir, data, tmp_path / "out")
    saved = load_from_disk(str(tmp_path / "out"))
    assert (len(saved["train"]), len(saved["eval"])) == (8, 2)
    assert stats["rows"] == 10 and stats["train_rows"] == 8 and stats["eval_rows"] == 2
    assert stats["truncation_rate"] == 0 and 0 < stats["tokens_p50"] <= stats["tokens_max"] <= 128
    reference = saved["eval"][0]["reference"]
    assert reference.endswith(".") and json.loads(saved["eval"][0]["prompt"])[-1]["role"] == "user"


def test_bad_row_stops_the_run_by_default(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(10, 1)))
    with pytest.raises(DatasetError, match=r"row 11: field 'output' is missing"):
        build(_setup(model_dir, data)[0], model_dir, data, tmp_path / "out")


def test_drop_counts_invalid_rows_by_reason(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(18, 1) + [{"instruction": 3, "output": "x"}]))
    stats = build(_setup(model_dir, data, on_invalid="drop")[0], model_dir, data, tmp_path / "out")
    assert stats["rows"] == 18 and stats["dropped_invalid"] == 2
    assert stats["invalid_reasons"] == {"field 'output' is missing": 1,
                                        "field 'instruction' must be a string, got int": 1}


def test_drop_still_fails_past_the_invalid_fraction(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(6, 4)))
    with pytest.raises(DatasetError, match="40% of rows are invalid.*prep.max_invalid_fraction=0.1"):
        build(_setup(model_dir, data, on_invalid="drop")[0], model_dir, data, tmp_path / "out")


def test_answers_cut_off_entirely_are_dropped(model_dir, tmp_path):
    data = tmp_path / "d.json"
    rows = _rows(10, 0) + [{"instruction": "word " * 200, "output": "late answer"}]
    data.write_text(json.dumps(rows))
    cfg, fetched = _setup(model_dir, data)
    stats = build(cfg, model_dir, data, tmp_path / "out")
    assert stats["dropped_cut_off"] == 1 and stats["truncation_rate"] > 0


def test_cache_key_follows_every_input(model_dir, tmp_path):
    cfg, fetched = _setup(model_dir, tmp_path / "d.json")
    key = cache_key(cfg, fetched)
    assert cache_key(cfg, fetched) == key
    assert cache_key(cfg.model_copy(update={"prep": cfg.prep.model_copy(update={"cutoff_len": 64})}), fetched) != key
    other = fetched.model_copy(update={"dataset": fetched.dataset.model_copy(update={"revision": "d2"})})
    assert cache_key(cfg, other) != key
