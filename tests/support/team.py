"""A team on one host, each member its own machine: a folder, HOME, Prefect home and Hub cache of its own; the
deployer runs `make deploy`, workers serve the cpu and gpu pools, the client submits pipelines."""

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

from tests.support.servers import mlflow_server as start_mlflow

REPO = Path(__file__).resolve().parents[2]
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
