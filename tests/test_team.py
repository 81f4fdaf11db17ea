"""Team mode as a team runs it: `prefect server start`, `mlflow server` with proxied artifacts, `make deploy`, and
one `process` worker per pool, each on its own "machine": its own folder (HOME, TMPDIR), Prefect home, Hub cache and
tuneflow cache, in a private mount namespace where the other machines' folders, the MLflow server's artifact store
and everything else the test session wrote are hidden under empty tmpfs mounts. Stages can only reach each other's
outputs through MLflow and the Hub (olah).

Runs are submitted through the API exactly as the UI's run form does (create a flow run of the deployment with the
`config` parameter).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.servers import mlflow_server as start_mlflow
from tests.servers import training_rank_pid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = Path(sys.executable).parent / "prefect"
MACHINES = ("deployer", "cpu", "gpu-1", "gpu-2", "client", "shared-home")
PIPELINE, TRAINING = "tuneflow-finetune/on-demand", "tuneflow-train/gpu"
STAGES = ("download", "prepare", "train", "evaluate", "export")


@dataclass
class Team:
    api: str
    mlflow: str
    hub: object
    machines: Path
    hidden_always: list[Path]  # the pytest session folder: servers' data, the Hub mirror's repos, tiny assets

    def folder(self, machine: str) -> Path:
        return self.machines / machine


@contextlib.contextmanager
def start_team(prefect_api, hub_mirror, tmp_path_factory, gpu_concurrency: int = 1) -> Iterator[Team]:
    """An MLflow server, the machines' folders, and `make deploy GPU_CONCURRENCY=<gpu_concurrency>`."""
    machines = Path(tempfile.mkdtemp(prefix="tuneflow-machines-"))
    for name in MACHINES:
        (machines / name / "tmp").mkdir(parents=True)
    try:
        with start_mlflow(tmp_path_factory.mktemp("team-mlflow")) as mlflow_uri:
            team = Team(prefect_api, mlflow_uri, hub_mirror, machines, [tmp_path_factory.getbasetemp()])
            env = machine_env(team, "deployer")
            done = subprocess.run(["make", "-C", str(REPO), "deploy", f"GPU_CONCURRENCY={gpu_concurrency}"], env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            yield team
    finally:
        shutil.rmtree(machines, ignore_errors=True)


@pytest.fixture(scope="module")
def team(prefect_api, hub_mirror, tmp_path_factory) -> Iterator[Team]:
    with start_team(prefect_api, hub_mirror, tmp_path_factory) as team:
        yield team


def machine_env(team: Team, machine: str, home: str | None = None) -> dict:
    """What README tells a worker machine to set, and nothing of the test's own environment. With ``home``, the
    HOME and caches are that folder's, shared with other workers (as `make stack` runs them); TMPDIR and the Prefect
    home stay the worker's own."""
    folder = team.folder(machine)
    shared = team.folder(home or machine)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_", "TUNEFLOW_"))}
    env.update(
        HOME=str(shared), TMPDIR=str(folder / "tmp"), PYTHONUNBUFFERED="1",
        PREFECT_API_URL=team.api, PREFECT_HOME=str(folder / "prefect-home"), PREFECT_WORKER_QUERY_SECONDS="1",
        MLFLOW_TRACKING_URI=team.mlflow,
        HF_ENDPOINT=team.hub.endpoint, HF_HOME=str(shared / "hf-home"), HF_HUB_CACHE=str(shared / "hf-cache"),
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
        TUNEFLOW_CACHE=str(shared / "tuneflow-cache"),
    )
    return env


@contextlib.contextmanager
def worker(team: Team, pool: str, machine: str, run_once: bool = False,
           home: str | None = None) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool <pool>` on its own machine: everything but its own folder (and the shared
    ``home``, if given: see machine_env) is hidden."""
    folder = team.folder(machine)
    hidden = team.hidden_always + [team.folder(m) for m in MACHINES if m not in (machine, home)]
    probe = str(team.hidden_always[0])
    # Hide, check that hiding worked (the session folder now reads empty), then become the worker.
    script = ('probe="$1"; shift; for d in "$@"; do mount -t tmpfs none "$d" || exit 97; done; '
              '[ -z "$(ls -A "$probe")" ] || exit 98; '
              f'exec {PREFECT} worker start --pool {pool} --name {machine}{" --run-once" if run_once else ""}'
              f'{" --limit 1" if pool == "gpu" else ""}')  # a GPU machine trains one run at a time (README)
    log = open(folder / f"worker-{pool}.log", "ab")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script, "sh", probe, *map(str, hidden)], cwd=folder,
                            env=machine_env(team, machine, home), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        assert proc.returncode not in (97, 98), f"{machine}: could not hide the other machines' folders"


def worker_log(team: Team, machine: str, pool: str, tail: int | None = 8000) -> str:
    path = team.folder(machine) / f"worker-{pool}.log"
    if not path.is_file():
        return "(no log)"
    text = path.read_text(errors="replace")
    return text[-tail:] if tail else text


def tiny_config(team: Team, run_name: str, **train) -> dict:
    return {
        "run_name": run_name,
        "model": {"name_or_path": team.hub.model_id},
        "dataset": {"name_or_path": team.hub.dataset_id, "eval_size": 8},
        "prep": {"cutoff_len": 128},
        "train": {"method": "qlora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "learning_rate": 5e-3,
                  "max_steps": 12, "save_steps": 4, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                  "deepspeed": "none", "nproc_per_node": 1, "retries": 0, **train},
        "eval": {"max_samples": 8, "max_new_tokens": 12, "batch_size": 8},
        "export": {"max_shard_size": "300KB", "parity_samples": 8},
        "tracking": {"experiment": "team"},
    }


def submit(config: dict):
    """What the UI's run form does: a flow run of the pipeline deployment with the form's parameters."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(PIPELINE)
        return client.create_flow_run_from_deployment(
            deployment.id, parameters={"config": config, "train_deployment": TRAINING})


def wait_final(flow_run_id, timeout: float, context=lambda: ""):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name}\n{context()}"
            time.sleep(1)


def training_runs(flow_run_id) -> list:
    """The tuneflow-train flow runs started by one pipeline flow run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    return sorted((r for r in runs if r.parameters.get("request")), key=lambda r: r.created)


def mlflow_runs(team: Team, flow_run_id) -> tuple[object, dict]:
    """The pipeline's MLflow parent run and its children by stage name."""
    from mlflow import MlflowClient

    client = MlflowClient(team.mlflow)
    experiment = client.get_experiment_by_name("team")
    parents = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(parents) == 1, parents
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    return parents[0], {r.info.run_name: r for r in children}


def summary_of(team: Team, parent, into: Path) -> dict:
    from mlflow import MlflowClient

    path = MlflowClient(team.mlflow).download_artifacts(parent.info.run_id, "summary.json", str(into))
    return json.loads(Path(path).read_text())


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

    from tuneflow.tracking.artifacts import materialize_model

    logged = mlflow.search_logged_models(experiment_ids=[children["export"].info.experiment_id],
                                         filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert len(logged) == 1, logged  # the export is the pipeline run's MLflow model (the runs view's Models column)
    export = materialize_model(f"models:/{logged[0].model_id}", team.mlflow)
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
    assert f"restored checkpoint-{train['resumed_from_step']} from MLflow run" in worker_log(team, "gpu-2", "gpu", tail=None)
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
