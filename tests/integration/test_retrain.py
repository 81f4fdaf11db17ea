"""`tuneflow retrain` as a user runs it (the CLI, no Prefect server) against a real `mlflow server` with a model
registry and the olah Hub mirror: promote the first version, skip when nothing changed, retrain after a new dataset
commit, keep the champion when the challenger is worse, and refuse bad input before anything trains. Then the
scheduled deployment and its event trigger on a real `prefect server start`; last, the guards of the promotion gate.

The tests of this module run in order: each starts from the registry the previous one left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.multiple_choice import questions, write_jsonl
from tests.support.servers import add_repo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TUNEFLOW = Path(sys.executable).parent / "tuneflow"
NAME = "tiny-assistant"
DATASET = "tiny-org/retrain-data"


@pytest.fixture(scope="module")
def world(hub_mirror, tiny_assets, mlflow_server, tmp_path_factory):
    """A dataset repo of its own on the mirror (the tests add commits to it), and a folder for configs and caches."""
    folder = tmp_path_factory.mktemp("retrain")
    sha = add_repo(hub_mirror.mirror, "dataset", DATASET, tiny_assets["data"])
    return {"hub": hub_mirror, "mlflow": mlflow_server, "folder": folder, "dataset_sha": sha,
            "data": tiny_assets["data"]}


def config(world, sections: dict | None = None, **train) -> Path:
    """The retrain config of these tests, with train settings and whole sections (None: left out) replaced."""
    cfg = {
        "run_name": "retrain",
        "output_dir": str(world["folder"] / "runs"),
        "model": {"name_or_path": world["hub"].model_id},
        "dataset": {"name_or_path": DATASET, "eval_size": 8},
        "prep": {"cutoff_len": 128},
        "train": {"method": "qlora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "learning_rate": 5e-3,
                  "max_steps": 12, "save_steps": 12, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                  "deepspeed": "none", "nproc_per_node": 1, "retries": 0, **train},
        "eval": {"max_samples": 8, "max_new_tokens": 8, "batch_size": 8, "compare_base": False},
        "export": {"max_shard_size": "300KB", "parity_samples": 4},
        "tracking": {"experiment": "retrain"},
        "registry": {"model_name": NAME, "eval_samples": 8},
    }
    for key, value in (sections or {}).items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    path = world["folder"] / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tuneflow(world, *args: str, timeout: float = 900, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_"))}
    env.update(HF_ENDPOINT=world["hub"].endpoint, HF_HUB_CACHE=str(world["folder"] / "hf-cache"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", MLFLOW_TRACKING_URI=world["mlflow"],
               PREFECT_HOME=str(world["folder"] / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               **extra_env)
    return subprocess.run([str(TUNEFLOW), *args], env=env, cwd=world["folder"], capture_output=True, text=True,
                          timeout=timeout)


def retrain(world, *args: str, **extra_env: str) -> dict:
    done = tuneflow(world, "retrain", *args, **extra_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # the decision is stdout's last line


def client(world):
    from mlflow import MlflowClient

    return MlflowClient(world["mlflow"], registry_uri=world["mlflow"])


def aliases(world) -> dict[str, int]:
    return {alias: int(v) for alias, v in client(world).get_registered_model(NAME).aliases.items()}


def versions(world) -> list:
    return sorted(client(world).search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))


def train_runs(world) -> int:
    c = client(world)
    exp = c.get_experiment_by_name("retrain")
    return len(c.search_runs([exp.experiment_id], "tags.mlflow.runName = 'train'")) if exp else 0


def test_first_retrain_trains_registers_and_promotes(world):
    decision = retrain(world, "--config", str(config(world)))
    assert decision["decision"] == "promoted", decision
    assert decision["model_name"] == NAME and decision["version"] == 1 and decision["champion"] == 1
    assert decision["metric"] == "eval_loss"
    assert decision["scores"]["challenger"] <= decision["scores"]["base"], decision
    assert "champion" not in decision["scores"] and "no champion" in decision["reason"]
    assert aliases(world) == {"champion": 1, "challenger": 1}

    [v1] = versions(world)
    assert v1.tags["tuneflow.model_sha"] == world["hub"].model_sha
    assert v1.tags["tuneflow.dataset_sha"] == world["dataset_sha"]
    assert len(v1.tags["tuneflow.config_hash"]) == 16 and v1.tags["tuneflow.version"]
    assert v1.tags["tuneflow.decision"] == "promoted" and "tuneflow.metric.eval_loss" in v1.tags
    assert v1.tags["prefect.flow_run_id"]
    assert v1.source.startswith("models:/m-")  # the version is the export's logged MLflow model


def test_runs_show_their_data_and_model_in_mlflow(world):
    """The runs view's Dataset and Models columns, the model-training view, flat comparable params."""
    c = client(world)
    exp = c.get_experiment_by_name("retrain")
    assert exp.tags["mlflow.experimentKind"] == "finetuning"
    runs = {r.info.run_name: r for r in c.search_runs([exp.experiment_id], max_results=50)}
    parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags)
    contexts = {(d.dataset.name, t.value) for d in parent.inputs.dataset_inputs for t in d.tags}
    assert contexts == {(f"{DATASET}#train", "training"), (f"{DATASET}#eval", "evaluation")}, contexts
    source = json.loads(parent.inputs.dataset_inputs[0].dataset.source)
    assert source["path"] == DATASET and source["revision"] == world["dataset_sha"]
    assert parent.data.tags["tuneflow.config_hash"] and parent.data.tags["tuneflow.decision"] == "promoted"
    assert parent.data.params["train.learning_rate"] == "0.005"  # flat dotted keys: Compare shows a table
    for stage, context in (("train", "training"), ("evaluate", "evaluation")):
        run = runs[stage]
        assert [t.value for d in run.inputs.dataset_inputs for t in d.tags] == [context], stage
    decide = runs["decide"]
    assert [d.dataset.name for d in decide.inputs.dataset_inputs] == [f"{NAME}#frozen-eval"]
    logged = c.search_logged_models([exp.experiment_id])
    assert [m.source_run_id for m in logged] == [parent.info.run_id]  # the runs view's Models column
    assert [m.model_id for m in runs["export"].outputs.model_outputs] == [logged[0].model_id]
    assert "eval_loss" in {m.key for m in logged[0].metrics}  # the model page shows its held-out metrics


def test_champion_loads_and_generates_from_the_registry(world):
    """`models:/<name>@champion` is the export this machine wrote: the same answer, token for token."""
    [export] = (world["folder"] / "runs").glob("retrain-*/export")
    prompt = ["--prompt", "Add 2 and 3.", "--max-new-tokens", "8"]
    registry = tuneflow(world, "generate", "--model", f"models:/{NAME}@champion", *prompt, timeout=300)
    local = tuneflow(world, "generate", "--model", str(export), *prompt, timeout=300)
    assert registry.returncode == 0 and local.returncode == 0, registry.stderr[-3000:] + local.stderr[-3000:]
    assert registry.stdout == local.stdout


def test_nothing_changed_is_skipped_without_training(world, prefect_api):
    """Against a Prefect server this time: the decision is also the flow run's markdown artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    before = train_runs(world)
    started = time.monotonic()
    decision = retrain(world, "--config", str(config(world)), PREFECT_API_URL=prefect_api)
    assert decision["decision"] == "skipped" and decision["version"] == 1 and decision["champion"] == 1, decision
    assert time.monotonic() - started < 60
    assert train_runs(world) == before and len(versions(world)) == 1
    with get_client(sync_client=True) as client:
        decision = ArtifactFilter(key=ArtifactFilterKey(any_=["tuneflow-decision"]))
        # the session's Prefect server also holds other tests' retrain decisions (other registered names)
        [artifact] = [a for a in client.read_artifacts(artifact_filter=decision) if a.data.startswith(f"# {NAME}:")]
    assert artifact.type == "markdown" and f"{NAME}: skipped" in artifact.data and "nothing changed" in artifact.data


def test_a_new_dataset_commit_retrains_and_a_worse_challenger_is_kept(world):
    """The dataset gets a new commit on the Hub: the retrain trains (two steps at a tiny learning rate, so the
    challenger is clearly worse), registers v2, keeps the champion and points `challenger` at v2."""
    rows = json.loads(Path(world["data"]).read_text())
    new_data = world["folder"] / "new" / Path(world["data"]).name
    new_data.parent.mkdir()
    new_data.write_text(json.dumps(rows + rows[:40]))
    sha = add_repo(world["hub"].mirror, "dataset", DATASET, new_data, message="more rows")
    decision = retrain(world, "--config", str(config(world, max_steps=2, learning_rate=1e-6)))
    assert decision["decision"] == "kept" and decision["version"] == 2 and decision["champion"] == 1, decision
    assert set(decision["scores"]) == {"challenger", "champion", "base"}
    v2 = versions(world)[-1]
    assert v2.tags["tuneflow.dataset_sha"] == sha and v2.tags["tuneflow.decision"] == "kept"
    assert aliases(world) == {"champion": 1, "challenger": 2}
    tags = client(world).get_model_version(NAME, "1").tags
    assert tags["tuneflow.last_challenge"].startswith("v2 kept")


def test_bad_input_is_refused_before_anything_trains(world, tmp_path):
    before = train_runs(world)
    unnamed = tuneflow(world, "retrain", "--config", str(config(world)), "--set", "registry.model_name=")
    assert unnamed.returncode == 2 and "registry.model_name" in unnamed.stderr, unnamed.stderr[-2000:]
    unnamed = tuneflow(world, "retrain", "--config", str(config(world)), "--set", "registry.model_name=null")
    assert unnamed.returncode == 2 and "registry.model_name" in unnamed.stderr, unnamed.stderr[-2000:]
    metric = tuneflow(world, "retrain", "--config", str(config(world)), "--set", "registry.metric=accuracy")
    assert metric.returncode == 2 and "registry.metric" in metric.stderr and "eval_loss" in metric.stderr

    # A changed config would train, but the champion's frozen evaluation set is gone: stop first, say what to do.
    c = client(world)
    tag = c.get_registered_model(NAME).tags["tuneflow.eval_set"]
    ref = json.loads(tag)
    c.set_registered_model_tag(NAME, "tuneflow.eval_set", json.dumps({**ref, "path": "deleted",
                                                                      "digest": "sha256:" + "0" * 64}))
    try:
        gone = tuneflow(world, "retrain", "--config", str(config(world, max_steps=3)))
    finally:
        c.set_registered_model_tag(NAME, "tuneflow.eval_set", tag)
    assert gone.returncode == 2, gone.stderr[-3000:]
    assert "frozen evaluation set" in gone.stderr and "--refreeze-eval-set" in gone.stderr, gone.stderr[-3000:]
    assert train_runs(world) == before


def test_a_tracking_store_without_a_registry_is_refused(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_"))}
    path = config(world)
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"]["uri"] = (tmp_path / "mlruns").as_uri()  # a file store: no registry for new features
    path.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([str(TUNEFLOW), "retrain", "--config", str(path)], env={
        **env, "HF_ENDPOINT": world["hub"].endpoint, "PREFECT_HOME": str(tmp_path / "prefect")},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "tracking.uri" in done.stderr and "cannot serve a model registry" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_the_scheduled_deployment_waits_paused_and_runs_on_the_dataset_event(prefect_api, tmp_path):
    """`make deploy` on a real Prefect server: the retrain schedule ships inactive, at most one run at a time, and
    `tuneflow emit-dataset-updated` creates a retrain flow run through the deployment's trigger."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "HF_"))}
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / "prefect-home"), HOME=str(tmp_path))
    done = subprocess.run(["make", "-C", str(REPO), "deploy"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("tuneflow-retrain/scheduled")
        runs = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        assert [s.active for s in deployment.schedules] == [False]
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
        assert client.read_flow_runs(deployment_filter=runs) == []  # paused: the schedule made no runs

        emitted = subprocess.run([str(TUNEFLOW), "emit-dataset-updated", "--dataset", DATASET, "--revision", "f" * 40],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert emitted.returncode == 0, emitted.stderr[-3000:]
        assert json.loads(emitted.stdout.strip().splitlines()[-1])["revision"] == "f" * 40
        deadline = time.monotonic() + 30
        while not (created := client.read_flow_runs(deployment_filter=runs)) and time.monotonic() < deadline:
            time.sleep(1)
        try:
            assert len(created) == 1, "the event created no retrain run within 30 s"
            assert created[0].parameters["config"]["registry"]["model_name"] == "qwen2.5-7b-sft"
        finally:
            for run in created:  # no worker serves it here; leave nothing for other tests' workers
                client.delete_flow_run(run.id)


def test_emit_without_a_server_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path))
    done = subprocess.run([str(TUNEFLOW), "emit-dataset-updated", "--dataset", DATASET], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "PREFECT_API_URL" in done.stderr, done.stderr


def test_the_mlflow_ui_shows_each_run_with_its_data_and_model(world, chromium, tmp_path):
    """What a user sees at the link tuneflow gives: MLflow's model-training view, and on the pipeline run's row its
    datasets (Dataset column) and the registered model (Models column)."""
    from playwright.sync_api import sync_playwright

    from tuneflow.tracking.runs import run_url

    exp = client(world).get_experiment_by_name("retrain")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 2400, "height": 1400})
        page.goto(run_url(world["mlflow"], exp.experiment_id))
        page.get_by_text("Model registry").first.wait_for(timeout=60_000)  # the model-training navigation
        row = page.locator("[role=row]", has_text=f"{DATASET}#train").first
        row.wait_for(timeout=60_000)
        page.get_by_text(NAME).first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "mlflow-runs.png"))
        text = page.inner_text("body")
        browser.close()
    assert "Traces" in text and "Sessions" not in text, "not the model-training view"  # GenAI nav lists Sessions
    assert f"{DATASET}#eval" in text and "Evaluation" in text


def guarded_config(world, guards: list[dict], max_steps: int) -> Path:
    """Trained longer than the champion (so it wins on eval_loss), scored on the team's own multiple-choice set, and
    judged against the champion by the tiny model (from the Hub mirror) where a guard asks for it."""
    skills = write_jsonl(questions(8), world["folder"] / "skills.jsonl")
    path = config(world, max_steps=max_steps)
    cfg = yaml.safe_load(path.read_text())
    cfg["eval"]["benchmarks"] = [{"name": "skills", "dataset": str(skills)}]
    if any(g["metric"].startswith("judge.") for g in guards):
        cfg["eval"]["judge"] = {"model": world["hub"].model_id, "elo_rounds": 100}
    cfg["registry"]["guards"] = guards
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_winner_that_fails_a_guard_keeps_the_champion_and_says_which(world):
    before = aliases(world)["champion"]
    decision = retrain(world, "--config", str(guarded_config(world, [
        {"metric": "bench.skills.acc", "min": 0.0}, {"metric": "eval_loss", "max": 0.01}], max_steps=40)))
    assert decision["decision"] == "kept" and aliases(world)["champion"] == before, decision
    assert decision["scores"]["challenger"] < decision["scores"]["champion"], decision  # it won on eval_loss
    bench, loss = decision["guards"]
    assert bench["metric"] == "bench.skills.acc" and bench["passed"] is True and bench["limit"] == "min 0"
    assert 0 <= bench["challenger"] <= 1 and 0 <= bench["champion"] <= 1, bench  # scored for both, same questions
    assert loss == {"metric": "eval_loss", "challenger": decision["scores"]["challenger"],
                    "champion": decision["scores"]["champion"], "limit": "max 0.01", "passed": False}
    assert (f"but it fails guard eval_loss: the challenger's {loss['challenger']:.4f} is over max 0.01"
            in decision["reason"]), decision["reason"]
    version = client(world).get_model_version(NAME, str(decision["version"]))
    assert version.tags["tuneflow.guard.eval_loss"].startswith("fails (challenger ")
    assert version.tags["tuneflow.guard.bench.skills.acc"].startswith("holds (challenger ")


def test_a_winner_that_keeps_every_guard_is_promoted(world):
    decision = retrain(world, "--config", str(guarded_config(world, [
        {"metric": "bench.skills.acc", "min": 0.0}, {"metric": "eval_loss", "max": 100},
        {"metric": "judge.consistency", "min": 0.0}], max_steps=41)))
    assert decision["decision"] == "promoted", decision
    assert [g["passed"] for g in decision["guards"]] == [True] * 3 and "every guard holds" in decision["reason"]
    assert aliases(world)["champion"] == decision["version"]
    judged = decision["guards"][2]  # the challenger against the champion, on the 8 frozen rows, both orders
    assert judged["champion"] is None and 0 <= judged["challenger"] <= 1, judged
    c = client(world)
    decide = c.search_runs([c.get_experiment_by_name("retrain").experiment_id], "tags.mlflow.runName = 'decide'",
                           order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert decide.data.metrics["challenger.judge.consistency"] == judged["challenger"]
    assert decide.data.tags["tuneflow.judge"] == f"{world['hub'].model_id}@{world['hub'].model_sha}"
    verdicts = json.loads(Path(c.download_artifacts(decide.info.run_id, "judge/verdicts.json",
                                                    str(world["folder"] / "verdicts"))).read_text())
    assert len(verdicts["data"]) == 8 and judged["challenger"] == pytest.approx(
        sum(row[verdicts["columns"].index("consistent")] for row in verdicts["data"]) / 8)
