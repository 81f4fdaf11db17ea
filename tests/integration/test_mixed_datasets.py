"""Several training datasets from the Hub, mixed by weight, with an evaluation dataset of its own, through
`tuneflow retrain` (the CLI, no Prefect server) against a real `mlflow server` and the olah Hub mirror: every source
pinned by commit and shown in MLflow, the realised mix logged, and a new commit of any one training source retrains
while an unchanged set of sources skips.

The tests of this module run in order: each starts from the registry the previous one left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_retrain import client
from tests.integration.test_retrain import config as retrain_config
from tests.integration.test_retrain import retrain as retrain_decision
from tests.support.servers import add_repo
from tuneflow.modeling.demo import make_rows

pytestmark = pytest.mark.slow

NAME = "mixed-assistant"
FIRST, SECOND, HELD_OUT = "tiny-org/mix-first", "tiny-org/mix-second", "tiny-org/mix-eval"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def renamed(rows: list[dict]) -> list[dict]:
    """Alpaca rows under the column names of a dataset found on the Hub."""
    return [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in rows]


def as_messages(rows: list[dict]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{r['instruction']}\n{r['input']}".strip()},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]


@pytest.fixture(scope="module")
def world(hub_mirror, tiny_assets, mlflow_server, tmp_path_factory):
    """Three dataset repos on the mirror: alpaca rows, the same task under other column names, and an evaluation
    set in messages format whose repo also holds a train split that must not be read."""
    folder = tmp_path_factory.mktemp("mixed")
    mirror = hub_mirror.mirror
    second = write_jsonl(folder / "second" / "rows.jsonl", renamed(make_rows(80, seed=1)))
    held_out = folder / "held-out"
    write_jsonl(held_out / "data" / "test-00000-of-00001.jsonl", as_messages(make_rows(16, seed=2)))
    write_jsonl(held_out / "data" / "train-00000-of-00001.jsonl", [{"not": "read"}])
    shas = {FIRST: add_repo(mirror, "dataset", FIRST, tiny_assets["data"]),
            SECOND: add_repo(mirror, "dataset", SECOND, second),
            HELD_OUT: add_repo(mirror, "dataset", HELD_OUT, held_out)}
    return {"hub": hub_mirror, "mlflow": mlflow_server, "folder": folder, "shas": shas, "data": tiny_assets["data"],
            "second": second}


def config(world) -> Path:
    return retrain_config(world, {
        "run_name": "mixed", "output_dir": str(world["folder"] / "runs"), "dataset": None,
        "datasets": [{"name_or_path": FIRST, "weight": 3},
                     {"name_or_path": SECOND, "weight": 1,
                      "columns": {"instruction": "question", "input": "context", "output": "answer"}}],
        "eval_dataset": {"name_or_path": HELD_OUT, "format": "messages", "split": "test"},
        "tracking": {"experiment": "mixed"}, "registry": {"model_name": NAME, "eval_samples": 8}}, max_steps=6,
        save_steps=6)


def retrain(world) -> dict:
    return retrain_decision(world, "--config", str(config(world)))


def newest_version(world):
    return max(client(world).search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))


def test_two_hub_datasets_mixed_with_an_eval_dataset_of_its_own(world):
    decision = retrain(world)
    assert decision["decision"] == "promoted" and decision["version"] == 1, decision
    shas = world["shas"]
    v1 = newest_version(world)
    assert v1.tags["tuneflow.dataset_sha"] == f"{shas[FIRST]},{shas[SECOND]}"
    assert v1.tags["tuneflow.eval_dataset_sha"] == shas[HELD_OUT]

    c = client(world)
    exp = c.get_experiment_by_name("mixed")
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id], max_results=50)}
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    inputs = {(d.dataset.name, t.value): json.loads(d.dataset.source) for d in parent.inputs.dataset_inputs
              for t in d.tags}
    assert set(inputs) == {(f"{FIRST}#train", "training"), (f"{SECOND}#train", "training"),
                           (f"{HELD_OUT}#eval", "evaluation")}, inputs
    assert {(s["path"], s["revision"]) for s in inputs.values()} == {(name, sha) for name, sha in shas.items()}
    assert parent.data.params["datasets.0.weight"] == "3.0" and parent.data.params["eval_dataset.split"] == "test"

    # The realised mix: drawn 3:1 until the first source (240 rows) ran out; the second has 80.
    mix = runs["prepare"].data.metrics
    first, second = mix["mix.0.rows"], mix["mix.1.rows"]
    assert first + second == mix["train_rows"] and 0.65 < mix["mix.0.share"] < 0.85, mix
    assert 200 <= first <= 240 and 40 <= second <= 80, mix
    assert mix["eval_rows"] == 16  # the evaluation repo's test split, not its train split


def test_unchanged_sources_skip(world):
    decision = retrain(world)
    assert decision["decision"] == "skipped" and decision["version"] == 1, decision
    assert FIRST in decision["reason"] and SECOND in decision["reason"] and HELD_OUT in decision["reason"]


@pytest.mark.parametrize("changed", [SECOND, FIRST])
def test_a_new_commit_of_either_training_source_retrains(world, changed):
    before = int(newest_version(world).version)
    source = world["second"] if changed == SECOND else Path(world["data"])
    rows = (source.read_text().splitlines() if changed == SECOND else json.loads(source.read_text()))
    update = world["folder"] / "update" / changed / source.name
    update.parent.mkdir(parents=True)
    update.write_text("\n".join(rows[:-10]) + "\n" if changed == SECOND else json.dumps(rows[:-10]))
    world["shas"][changed] = add_repo(world["hub"].mirror, "dataset", changed, update, message="fewer rows")

    decision = retrain(world)
    assert decision["decision"] in ("promoted", "kept") and decision["version"] == before + 1, decision
    assert newest_version(world).tags["tuneflow.dataset_sha"] == f"{world['shas'][FIRST]},{world['shas'][SECOND]}"
