"""Team mode as a team runs it: `prefect server start`, `mlflow server` with proxied artifacts, `make deploy`, and
one `process` worker per pool, each on its own "machine": its own folder (HOME, TMPDIR), Prefect home, Hub cache and
tuneflow cache, in a private mount namespace where the other machines' folders, the MLflow server's artifact store
and everything else the test session wrote are hidden under empty tmpfs mounts. Stages can only reach each other's
outputs through MLflow and the Hub (olah).

Runs are submitted through the API exactly as the UI's run form does (create a flow run of the deployment with the
`config` parameter).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.servers import training_rank_pid
from tests.support.team import (
    STAGES,
    Team,
    mlflow_runs,
    start_team,
    submit,
    summary_of,
    tiny_config,
    training_runs,
    wait_final,
    worker,
    worker_log,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def team(prefect_api, hub_mirror, tmp_path_factory) -> Iterator[Team]:
    with start_team(prefect_api, hub_mirror, tmp_path_factory) as team:
        yield team


def test_pipeline_on_cpu_pool_trains_on_gpu_pool(team):
    with worker(team, "cpu", "cpu"), worker(team, "gpu", "gpu-1"):
        run = submit(tiny_config(team, "team"))
        logs = lambda: worker_log(team, "cpu", "cpu") + "\n--- gpu ---\n" + worker_log(team, "gpu-1", "gpu")  # noqa: E731
        run = wait_final(run.id, 600, logs)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{logs()}"
    assert run.work_pool_name == "cpu"
    trainings = training_runs(run.id)
    assert [(t.work_pool_name, t.state_type.value) for t in trainings] == [("gpu", "COMPLETED")]

    parent, children = mlflow_runs(team, run.id)
    assert parent.info.status == "FINISHED"
    assert sorted(children) == sorted(STAGES) and {c.info.status for c in children.values()} == {"FINISHED"}
    client_dir = team.folder("client")
    summary = summary_of(team, parent, client_dir / "summary")
    assert summary["status"] == "completed" and summary["stages"]["train"]["global_step"] == 12
    assert trainings[0].parameters["request"]["mlflow_run_id"] == children["train"].info.run_id
    # Checkpoints reached MLflow while training ran on the gpu machine.
    from mlflow import MlflowClient

    mlflow = MlflowClient(team.mlflow)
    uploaded = {Path(a.path).name for a in mlflow.list_artifacts(children["train"].info.run_id, "checkpoints")}
    assert {"checkpoint-4", "checkpoint-8", "checkpoint-12"} <= uploaded, uploaded

    # A third machine: the export and the predictions from MLflow only; the export answers as evaluation recorded.
    from tuneflow.core.config import TuneflowConfig
    from tuneflow.modeling.generation import generate
    from tuneflow.modeling.load import load_pretrained, load_tokenizer
    from tuneflow.sources.registered import registered_folder

    logged = mlflow.search_logged_models(experiment_ids=[children["export"].info.experiment_id],
                                         filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert len(logged) == 1, logged  # the export is the pipeline run's MLflow model (the runs view's Models column)
    export = registered_folder(f"models:/{logged[0].model_id}", team.mlflow)
    predictions = Path(mlflow.download_artifacts(children["evaluate"].info.run_id, "predictions/predictions.jsonl",
                                                 str(client_dir / "dl")))
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    cfg = TuneflowConfig.model_validate(tiny_config(team, "team"))
    from tuneflow.modeling.precision import compute_dtype, resolved

    # train.precision auto, resolved on the gpu machine (this machine's hardware) and recorded on both runs
    assert children["train"].data.params["train.precision_resolved"] == resolved(cfg).precision
    assert parent.data.params["train.precision_resolved"] == resolved(cfg).precision
    model = load_pretrained(export, cfg, compute_dtype(cfg), {"": "cpu"})  # as `tuneflow generate` loads it here
    answers = generate(model, load_tokenizer(export, cfg), [r["prompt"] for r in records], 12, 8)
    assert answers == [r["tuned"] for r in records]


def test_training_that_fails_on_the_gpu_worker_fails_the_pipeline_with_its_error(team):
    config = tiny_config(team, "team-fails", deepspeed="/nowhere/ds_config.json")
    with worker(team, "cpu", "cpu"), worker(team, "gpu", "gpu-1"):
        run = wait_final(submit(config).id, 600, lambda: worker_log(team, "cpu", "cpu"))
    assert run.state.is_failed(), run.state
    assert "training run" in run.state.message and "/nowhere/ds_config.json" in run.state.message, run.state.message
    [training] = training_runs(run.id)
    assert training.state.is_failed() and training.work_pool_name == "gpu"
    parent, children = mlflow_runs(team, run.id)
    assert parent.info.status == "FAILED" and children["train"].info.status == "FAILED"
    summary = summary_of(team, parent, team.folder("client") / "failed")
    assert summary["status"] == "failed" and summary["failed_stage"] == "train"
    assert "/nowhere/ds_config.json" in summary["stages"]["train"]["error"]


def rank_pid(machine_folder: Path) -> int | None:
    """Rank 0 of a training started by that machine's worker (its environment names the machine's cache)."""
    return training_rank_pid(0, in_environ=f"TUNEFLOW_CACHE={machine_folder / 'tuneflow-cache'}")


def test_training_killed_on_one_gpu_worker_resumes_on_another(team):
    from mlflow import MlflowClient

    config = tiny_config(team, "team-resume", max_steps=60, retries=1)
    mlflow = MlflowClient(team.mlflow)
    with worker(team, "cpu", "cpu"):
        run = submit(config)
        deadline = time.monotonic() + 300
        while not training_runs(run.id):  # the pipeline has asked for a training run: let gpu-1 take it, once
            assert time.monotonic() < deadline, worker_log(team, "cpu", "cpu")
            time.sleep(1)
        with worker(team, "gpu", "gpu-1", run_once=True) as gpu1:
            train_run_id = training_runs(run.id)[0].parameters["request"]["mlflow_run_id"]
            killed = None
            while killed is None:
                assert time.monotonic() < deadline and gpu1.poll() is None, worker_log(team, "gpu-1", "gpu")
                names = {Path(a.path).name for a in mlflow.list_artifacts(train_run_id, "checkpoints/checkpoint-4")}
                pid = rank_pid(team.folder("gpu-1")) if "tuneflow-complete" in names else None
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                time.sleep(0.2)
            gpu1.wait(timeout=300)  # --run-once: its failed run reported, the worker leaves
        with worker(team, "gpu", "gpu-2"):
            run = wait_final(run.id, 600, lambda: worker_log(team, "gpu-2", "gpu"))
    assert run.state.is_completed(), f"{run.state.message}\n{worker_log(team, 'gpu-2', 'gpu')}"
    first, second = training_runs(run.id)
    assert first.state.is_failed() and second.state.is_completed()
    parent, children = mlflow_runs(team, run.id)
    summary = summary_of(team, parent, team.folder("client") / "resume")
    train = summary["stages"]["train"]
    assert train["attempts"] == 2 and train["global_step"] == 60
    assert train["resumed_from_step"] is not None and train["resumed_from_step"] >= 4, train
    # gpu-2 got the checkpoint from MLflow: nothing of gpu-1's folder was visible to it.
    assert f"restored checkpoint-{train['resumed_from_step']} from MLflow run" in worker_log(team, "gpu-2", "gpu",
                                                                                             tail=None)
    assert "rank 0: exit code -9 (SIGKILL)" in children["train"].data.tags["attempt_1_error"]


def test_two_pipelines_at_once_share_one_gpu_slot(team):
    with worker(team, "cpu", "cpu"), worker(team, "gpu", "gpu-1"):
        runs = [submit(tiny_config(team, f"team-concurrent-{i}")) for i in range(2)]
        done = [wait_final(r.id, 900, lambda: worker_log(team, "gpu-1", "gpu")) for r in runs]
    assert all(r.state.is_completed() for r in done), [(r.state.name, r.state.message) for r in done]
    trainings = [t for r in done for t in training_runs(r.id)]
    assert len(trainings) == 2 and all(t.state.is_completed() for t in trainings)
    first, second = sorted(trainings, key=lambda t: t.start_time)
    assert first.end_time <= second.start_time, "two training runs overlapped with GPU_CONCURRENCY=1"


def test_cancelling_the_pipeline_cancels_its_training_run(team):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    config = tiny_config(team, "team-cancel", max_steps=400, save_steps=1000)
    with worker(team, "cpu", "cpu"), worker(team, "gpu", "gpu-1"):
        run = submit(config)
        deadline = time.monotonic() + 300
        while rank_pid(team.folder("gpu-1")) is None:  # training has started on the gpu machine
            assert time.monotonic() < deadline, worker_log(team, "gpu-1", "gpu")
            time.sleep(0.5)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
        run = wait_final(run.id, 120, lambda: worker_log(team, "cpu", "cpu"))
        [training] = training_runs(run.id)
        training = wait_final(training.id, 120, lambda: worker_log(team, "gpu-1", "gpu"))
        while rank_pid(team.folder("gpu-1")) is not None:  # the training processes are gone too
            assert time.monotonic() < deadline + 60, "training still runs after its flow run was cancelled"
            time.sleep(0.5)
    assert run.state.is_cancelled(), run.state
    assert training.state.is_cancelled(), training.state
