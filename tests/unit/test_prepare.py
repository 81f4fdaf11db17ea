"""The prepare stage's tokenized output: splits, statistics, invalid rows dropped or refused, the cache key."""

import json

import pytest
from datasets import Dataset, load_from_disk

from tasks.prepare import cache_key
from tests.support.reference import reference_encode
from tuneflow.core.config import TuneflowConfig
from tuneflow.core.results import DownloadResult, SourceRef
from tuneflow.data import prepare
from tuneflow.data.formats import DatasetError, load_dataset_rows, split_indices
from tuneflow.data.prepare import build
from tuneflow.data.tokenize import TemplateError, prompt_and_reference
from tuneflow.modeling.demo import build as build_assets
from tuneflow.modeling.demo import make_rows
from tuneflow.modeling.load import load_tokenizer


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
        datasets=[SourceRef(kind="dataset", name=str(data_file), revision="d1", local_path=str(data_file))],
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
    stats = build(cfg, model_dir, [data], tmp_path / "out")
    saved = load_from_disk(str(tmp_path / "out"))
    assert (len(saved["train"]), len(saved["eval"])) == (8, 2)
    assert stats["rows"] == 10 and stats["train_rows"] == 8 and stats["eval_rows"] == 2
    assert stats["truncation_rate"] == 0 and 0 < stats["tokens_p50"] <= stats["tokens_max"] <= 128
    reference = saved["eval"][0]["reference"]
    assert reference.endswith(".") and json.loads(saved["eval"][0]["prompt"])[-1]["role"] == "user"


def test_an_eval_dataset_of_its_own_is_the_eval_split(model_dir, tmp_path):
    """eval_dataset: every row of the dataset trains; the eval split is the other dataset's rows, read in its own
    format and columns."""
    data, held_out = tmp_path / "d.json", tmp_path / "eval.csv"
    data.write_text(json.dumps(_rows(10, 0)))
    held_out.write_text("question,answer\nAdd 7 and 7.,7 plus 7 is 14.\nAdd 8 and 8.,8 plus 8 is 16.\n"
                        "Add 9 and 9.,9 plus 9 is 18.\n")
    cfg, fetched = _setup(model_dir, data)
    cfg = cfg.model_validate({**cfg.model_dump(), "eval_dataset": {
        "name_or_path": str(held_out), "columns": {"instruction": "question", "output": "answer"}}})
    stats = build(cfg, model_dir, [data], tmp_path / "out", eval_path=held_out)
    saved = load_from_disk(str(tmp_path / "out"))
    assert (len(saved["train"]), len(saved["eval"])) == (10, 3) and stats["rows"] == 13
    assert [r for r in saved["eval"]["reference"]] == ["7 plus 7 is 14.", "8 plus 8 is 16.", "9 plus 9 is 18."]
    eval_ref = SourceRef(kind="dataset", name=str(held_out), revision="e1", local_path=str(held_out))
    key = cache_key(cfg, fetched.model_copy(update={"eval_dataset": eval_ref}))
    assert key != cache_key(cfg, fetched.model_copy(update={"eval_dataset": eval_ref.model_copy(
        update={"revision": "e2"})}))


def test_bad_row_stops_the_run_by_default(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(10, 1)))
    with pytest.raises(DatasetError, match=r"row 11: field 'output' is missing"):
        build(_setup(model_dir, data)[0], model_dir, [data], tmp_path / "out")


def test_drop_counts_invalid_rows_by_reason(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(18, 1) + [{"instruction": 3, "output": "x"}]))
    stats = build(_setup(model_dir, data, on_invalid="drop")[0], model_dir, [data], tmp_path / "out")
    assert stats["rows"] == 18 and stats["dropped_invalid"] == 2
    assert stats["invalid_reasons"] == {"field 'output' is missing": 1,
                                        "field 'instruction' must be a string, got int": 1}


def test_drop_still_fails_past_the_invalid_fraction(model_dir, tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(6, 4)))
    with pytest.raises(DatasetError, match="40% of rows are invalid.*prep.max_invalid_fraction=0.1"):
        build(_setup(model_dir, data, on_invalid="drop")[0], model_dir, [data], tmp_path / "out")


def test_answers_cut_off_entirely_are_dropped(model_dir, tmp_path):
    data = tmp_path / "d.json"
    rows = _rows(10, 0) + [{"instruction": "word " * 200, "output": "late answer"}]
    data.write_text(json.dumps(rows))
    cfg, fetched = _setup(model_dir, data)
    stats = build(cfg, model_dir, [data], tmp_path / "out")
    assert stats["dropped_cut_off"] == 1 and stats["truncation_rate"] > 0


def test_cache_key_follows_every_input(model_dir, tmp_path):
    cfg, fetched = _setup(model_dir, tmp_path / "d.json")
    key = cache_key(cfg, fetched)
    assert cache_key(cfg, fetched) == key
    assert cache_key(cfg.model_copy(update={"prep": cfg.prep.model_copy(update={"cutoff_len": 64})}), fetched) != key
    other = fetched.model_copy(update={"datasets": [fetched.datasets[0].model_copy(update={"revision": "d2"})]})
    assert cache_key(cfg, other) != key


# --- the batched, multi-process path against the plain per-row one ------------------------------------------


def reference_build(cfg, model_dir, data_file):
    """The splits (as row lists) and statistics of the per-row path."""
    tokenizer = load_tokenizer(model_dir, cfg)
    conversations, invalid = load_dataset_rows(data_file, cfg, cfg.dataset, "dataset")
    cutoff = cfg.prep.cutoff_len
    splits, lengths = {}, []
    split_rows = split_indices(len(conversations), cfg.dataset.eval_size, cfg.train.seed)
    for split, indices in zip(("train", "eval"), split_rows):
        rows = []
        for i in indices:
            enc = reference_encode(tokenizer, conversations[i], cutoff)
            lengths.append(enc["full_length"])
            if any(label != -100 for label in enc["labels"]):
                prompt, reference = prompt_and_reference(conversations[i])
                rows.append({**enc, "prompt": json.dumps(prompt, ensure_ascii=False), "reference": reference})
        splits[split] = rows
    ordered = sorted(lengths)
    stats = {
        "rows": len(conversations),
        "train_rows": len(splits["train"]),
        "eval_rows": len(splits["eval"]),
        "dropped_cut_off": len(conversations) - len(splits["train"]) - len(splits["eval"]),
        "dropped_invalid": sum(invalid.values()),
        "invalid_reasons": dict(invalid),
        "truncation_rate": sum(n > cutoff for n in lengths) / len(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_p50": float(ordered[int(0.5 * len(ordered))]),
        "tokens_p95": float(ordered[int(0.95 * len(ordered))]),
        "tokens_max": float(ordered[-1]),
        "train_label_tokens": sum(sum(t != -100 for t in row["labels"]) for row in splits["train"]),
        "mix": [{"name": cfg.dataset.name_or_path, "weight": 1.0, "available": len(split_rows[0]),
                 "rows": len(splits["train"]), "share": 1.0}],
    }
    return splits, stats


@pytest.fixture(scope="module")
def zh_model_dir(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny-zh"), n_rows=30, lang="zh")["model"]


def _mixed_rows(lang):
    """Alpaca rows of varied lengths: some with a system prompt or history (several answers), some cut off
    (truncated, or their answer entirely past cutoff_len) and one invalid."""
    rows = make_rows(36, lang=lang, seed=3)
    for i, row in enumerate(rows):
        if i % 4 == 1:
            row["system"] = "简短回答。" if lang == "zh" else "Answer briefly."
        if i % 3 == 2:
            row["history"] = [[r["instruction"], r["output"]] for r in rows[i - 2:i]]
        if i % 7 == 3:
            row["input"] = " ".join([row["input"] or row["instruction"]] * (6 + i % 5))
    return rows + [{"instruction": "no answer"}]


def _messages_rows():
    """Conversations in the messages format with one to four answers, a system prompt on every other one."""
    rows = []
    for i, base in enumerate(make_rows(30, seed=5)):
        turns = [] if i % 2 else [{"role": "system", "content": "Be brief."}]
        for j in range(1 + i % 4):
            turns += [{"role": "user", "content": f"{base['instruction']} ({j}) {base['input']}"},
                      {"role": "assistant", "content": base["output"] * (1 + j)}]
        rows.append({"messages": turns})
    return rows


@pytest.mark.parametrize("num_proc", [1, 2])
@pytest.mark.parametrize("kind", ["alpaca", "messages", "alpaca-zh"])
def test_batched_build_matches_per_row_reference(model_dir, zh_model_dir, tmp_path, kind, num_proc):
    rows = {"alpaca": _mixed_rows("en"), "messages": _messages_rows(), "alpaca-zh": _mixed_rows("zh")}[kind]
    model = zh_model_dir if kind == "alpaca-zh" else model_dir
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    cfg = _setup(model, data, cutoff_len=48, on_invalid="drop", max_invalid_fraction=0.5)[0]
    cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={
        "format": "messages" if kind == "messages" else "alpaca", "eval_size": 6})})

    stats = build(cfg, model, [data], tmp_path / "out", num_proc=num_proc)
    expected_splits, expected_stats = reference_build(cfg, model, data)

    saved = load_from_disk(str(tmp_path / "out"))
    for split in ("train", "eval"):
        assert saved[split].to_list() == expected_splits[split]
        assert saved[split].features == Dataset.from_list(expected_splits[split]).features
    assert stats == expected_stats == json.loads((tmp_path / "out" / "stats.json").read_text())
    # The data exercise what they should: several answers per row, truncation, answers cut off entirely.
    assert any(sum(m["role"] == "assistant" for m in json.loads(r["prompt"])) >= 2 for r in expected_splits["train"])
    assert 0 < stats["truncation_rate"] < 1 and stats["dropped_cut_off"] > 0 and stats["train_rows"] > 10


@pytest.mark.parametrize("num_proc", [1, 2])
def test_batched_build_keeps_the_errors(model_dir, tmp_path, num_proc):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(_rows(10, 0)))
    cfg = _setup(model_dir, data, cutoff_len=8)[0]
    with pytest.raises(ValueError, match=r"^no train rows left: every answer lies past prep.cutoff_len=8$"):
        build(cfg, model_dir, [data], tmp_path / "out", num_proc=num_proc)

    # Puts the number of turns first: adding a turn changes the text rendered for the earlier ones.
    unstable = "{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    cfg = _setup(model_dir, data)[0]
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"chat_template": unstable})})
    with pytest.raises(TemplateError, match="does not render earlier turns unchanged"):
        build(cfg, model_dir, [data], tmp_path / "out2", num_proc=num_proc)


def test_small_datasets_are_tokenized_in_one_process(monkeypatch):
    monkeypatch.setattr(prepare, "usable_cores", lambda: 8)
    assert [prepare.default_num_proc(n) for n in (10, 3_999, 4_000, 15_999, 100_000)] == [1, 1, 2, 7, 8]


# --- several datasets, mixed -------------------------------------------------------------------------------------


def _mixed_setup(model_dir, tmp_path, strategy="interleave_under", **second):
    """Two sources: 40 alpaca rows (weight 3) and 20 CSV rows with their own column names (weight 1)."""
    first, other = tmp_path / "a.json", tmp_path / "b.csv"
    first.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "output": f"A{i}."} for i in range(40)]))
    other.write_text("question,answer\n" + "".join(f"Double {i}.,B{i}.\n" for i in range(20)))
    cfg = TuneflowConfig.model_validate({
        "model": {"name_or_path": str(model_dir)},
        "datasets": [{"name_or_path": str(first), "weight": 3, "eval_size": 4},
                     {"name_or_path": str(other), "columns": {"instruction": "question", "output": "answer"},
                      "eval_size": 2, **second}],
        "prep": {"cutoff_len": 128, "mix_strategy": strategy},
    })
    return cfg, [first, other]


def _origins(references: list[str]) -> dict[str, int]:
    return {source: sum(r.startswith(source) for r in references) for source in "AB"}


def test_datasets_are_mixed_to_their_weights_until_one_runs_out(model_dir, tmp_path):
    cfg, paths = _mixed_setup(model_dir, tmp_path)
    stats = build(cfg, model_dir, paths, tmp_path / "out")
    saved = load_from_disk(str(tmp_path / "out"))
    train = _origins(saved["train"]["reference"])
    # interleave_under: rows drawn 3:1 until the first source (36 training rows) runs out.
    assert train["A"] == 36 and 6 <= train["B"] <= 18, train
    assert [(m["rows"], m["available"], m["weight"]) for m in stats["mix"]] == [(36, 36, 3.0), (train["B"], 18, 1.0)]
    assert stats["mix"][0]["share"] == pytest.approx(36 / (36 + train["B"]))
    # Each source holds out its own eval_size before the mix, shuffled together (evaluation scores the first rows);
    # none of those rows trains.
    assert _origins(saved["eval"]["reference"]) == {"A": 4, "B": 2}
    assert [r[0] for r in saved["eval"]["reference"]] != ["A"] * 4 + ["B"] * 2
    assert not set(saved["eval"]["reference"]) & set(saved["train"]["reference"])
    again = build(cfg, model_dir, paths, tmp_path / "again")
    assert again == stats
    assert load_from_disk(str(tmp_path / "again"))["train"]["reference"] == saved["train"]["reference"]


@pytest.mark.parametrize(("strategy", "expected"), [("interleave_over", None), ("concat", {"A": 36, "B": 18})])
def test_other_mix_strategies(model_dir, tmp_path, strategy, expected):
    cfg, paths = _mixed_setup(model_dir, tmp_path, strategy)
    stats = build(cfg, model_dir, paths, tmp_path / "out")
    references = load_from_disk(str(tmp_path / "out"))["train"]["reference"]
    train = _origins(references)
    if expected:
        assert train == expected and len(set(references)) == len(references)
    else:  # every row of both is used; the smaller source repeats until the larger one ran out too
        assert train["B"] >= 18 and len(set(references)) == 36 + 18 and train["A"] > 36
    assert [m["rows"] for m in stats["mix"]] == [train["A"], train["B"]]


def test_max_samples_and_split_choose_a_sources_rows(model_dir, tmp_path):
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train-00000.jsonl").write_text(
        "".join(json.dumps({"question": f"Double {i}.", "answer": f"B{i}."}) + "\n" for i in range(30)))
    (folder / "data" / "test-00000.jsonl").write_text(json.dumps({"question": "x", "answer": "T0."}) + "\n")
    cfg, paths = _mixed_setup(model_dir, tmp_path, "concat", split="train", max_samples=12)
    cfg = cfg.model_validate({**cfg.model_dump(), "datasets": [cfg.datasets[0].model_dump(), {
        **cfg.datasets[1].model_dump(), "name_or_path": str(folder)}]})
    stats = build(cfg, model_dir, [paths[0], folder], tmp_path / "out")
    saved = load_from_disk(str(tmp_path / "out"))
    references = [*saved["train"]["reference"], *saved["eval"]["reference"]]
    assert stats["mix"][1]["available"] == 10  # the first 12 rows of the train split, 2 held out
    assert _origins(references)["B"] == 12 and not any(r.startswith("T") for r in references)
    cfg.datasets[1].split = "validation"
    with pytest.raises(DatasetError, match="no data file of split 'validation'"):
        build(cfg, model_dir, [paths[0], folder], tmp_path / "out2")


def test_preference_pairs_keep_their_rejected_answer(model_dir, tmp_path):
    """A pair is prepared as its chosen conversation (eval loss and generation read it as any row) plus the rejected
    answer, which DPO reads beside it."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."})
                            + "\n" for i in range(10)))
    cfg = TuneflowConfig.model_validate({
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"name_or_path": str(data), "format": "preference", "eval_size": 2},
        "prep": {"cutoff_len": 128}, "train": {"objective": "dpo"},
    })
    stats = build(cfg, model_dir, [data], tmp_path / "out")
    saved = load_from_disk(str(tmp_path / "out"))
    assert stats["train_rows"] == 8 and saved["train"].column_names[-1] == "rejected"
    for row in [*saved["train"], *saved["eval"]]:
        i = int(json.loads(row["prompt"])[-1]["content"].split()[1])
        assert (row["reference"], row["rejected"]) == (f"{i + 1}.", f"{i + 2}.")
        assert json.loads(row["prompt"]) == [{"role": "user", "content": f"Add {i} and 1."}]


def test_pairs_whose_prompt_leaves_no_room_are_dropped_and_named(model_dir, tmp_path):
    """A pair whose prompt fills prep.cutoff_len has no answer tokens to compare: dropped and counted; when none is
    left, the error says why in a pair's terms."""
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Add {i} and 1.", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "prompt": "word " * 200}]))
    cfg = TuneflowConfig.model_validate({
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"name_or_path": str(data), "format": "preference", "eval_size": 2},
        "prep": {"cutoff_len": 128}, "train": {"objective": "dpo"},
    })
    assert build(cfg, model_dir, [data], tmp_path / "out")["dropped_cut_off"] == 1
    cfg.prep.cutoff_len = 8
    with pytest.raises(ValueError, match=r"^no train pairs left: every prompt leaves no room for its answers under "
                                         r"prep.cutoff_len=8$"):
        build(cfg, model_dir, [data], tmp_path / "out2")
