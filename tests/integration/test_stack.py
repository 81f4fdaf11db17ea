"""`make stack` as a user runs it, on a temporary STACK_DIR: PostgreSQL, Prefect and MLflow on it with authentication,
the deployments and a worker per pool; a pipeline run through it; wrong credentials refused in one line; and
`make stack-stop` leaving no process and no open port behind.

The Hub is the session's olah mirror (tests/conftest.py); the workers inherit HF_ENDPOINT from `make stack`'s
environment as a user's would inherit HF_TOKEN.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests.support.team import PIPELINE, STAGES, tiny_config
from tuneflow.core.ports import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/usr/lib/postgresql/15/bin/initdb").is_file(),
                                 reason="PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin)")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLIENT_VARS = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD")


def read_env_file(path: Path) -> dict[str, str]:
    """The variables `source <stack>/env` exports, read by the shell itself."""
    out = subprocess.run(["bash", "-c", f'set -a; source "{path}"; env -0'], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout
    pairs = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
    return {k: pairs[k] for k in CLIENT_VARS}


def user_env(hub, folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_", "STACK_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(folder / "hf-home"), HF_HUB_CACHE=str(folder / "hf-cache"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", PREFECT_WORKER_QUERY_SECONDS="1")
    return env


def make(target: str, stack_dir: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(REPO), target, f"STACK_DIR={stack_dir}"], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(hub_mirror):
    folder = Path(tempfile.mkdtemp(prefix="tuneflow-stack-test-"))
    os.chmod(folder, 0o711)  # as root, PostgreSQL runs as the postgres user, which must pass through
    stack_dir = folder / "stack"
    env = user_env(hub_mirror, folder)
    ports = {name: free_port() for name in ("PG", "PREFECT", "MLFLOW")}
    env.update({f"STACK_{name}_PORT": str(port) for name, port in ports.items()})
    try:
        done = make("stack", stack_dir, env)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        yield SimpleNamespace(dir=stack_dir, env=env, ports=ports, output=done.stdout + done.stderr,
                              client=read_env_file(stack_dir / "env"), hub=hub_mirror,
                              secrets=json.loads((stack_dir / "secrets.json").read_text()))
    finally:
        make("stack-stop", stack_dir, env, timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def client(stack, monkeypatch):
    """This process as a user who ran `source .stack/env`."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    for key, value in stack.client.items():
        monkeypatch.setenv(key, value)
    with temporary_settings({PREFECT_API_URL: stack.client["PREFECT_API_URL"],
                             PREFECT_API_AUTH_STRING: stack.client["PREFECT_API_AUTH_STRING"]}):
        yield stack.client


def query(stack, database: str, sql: str) -> list[tuple]:
    """Ask the stack's PostgreSQL directly, as the database's own role."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=stack.ports["PG"], dbname=database, user=database,
                            password=stack.secrets[f"pg_{database}_password"])
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def stack_processes(stack) -> list[psutil.Process]:
    """Everything `make stack` started: the recorded process groups with all descendants, and the postmaster."""
    procs = []
    for pid_file in (stack.dir / "pids").glob("*.pid"):
        proc = psutil.Process(json.loads(pid_file.read_text())["pid"])
        procs += [proc, *proc.children(recursive=True)]
    procs.append(psutil.Process(int((stack.dir / "postgres/data/postmaster.pid").read_text().split()[0])))
    return procs


def listening(procs: list[psutil.Process]) -> set[tuple[str, int]]:
    pids = {p.pid for p in procs}
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def secrets_in(text: str, stack) -> list[str]:
    return [name for name, value in stack.secrets.items() if value in text or value.split(":")[-1] in text]


def test_stack_serves_prefect_and_mlflow_on_postgres_with_authentication(stack):
    import httpx

    client = stack.client
    prefect, mlflow = client["PREFECT_API_URL"], client["MLFLOW_TRACKING_URI"]
    assert prefect == f"http://127.0.0.1:{stack.ports['PREFECT']}/api"
    assert mlflow == f"http://127.0.0.1:{stack.ports['MLFLOW']}"
    assert f"source {stack.dir / 'env'}" in stack.output and prefect.removesuffix("/api") in stack.output
    assert not secrets_in(stack.output, stack), "make stack printed a credential"
    for private in ("env", "secrets.json"):
        assert stat.S_IMODE((stack.dir / private).stat().st_mode) == 0o600, private

    # Locked down: nothing without credentials, or with wrong ones; the real ones work.
    assert httpx.post(f"{prefect}/flows/filter", json={}).status_code == 401
    assert httpx.post(f"{prefect}/flows/filter", json={}, auth=("admin", "wrong")).status_code == 401
    right = httpx.BasicAuth(*client["PREFECT_API_AUTH_STRING"].split(":", 1))
    assert httpx.post(f"{prefect}/flows/filter", json={}, auth=right).status_code == 200
    search = f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search).status_code == 401
    assert httpx.get(search, auth=("admin", "wrong")).status_code == 401
    assert httpx.get(search, auth=(client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"])
                     ).status_code == 200

    # On PostgreSQL: the deployments `make stack` registered are rows of Prefect's database there, and MLflow's
    # schema (with the model registry) is in its own; no SQLite file stands in for either.
    deployments = {f"{flow}/{name}" for (flow, name) in query(
        stack, "prefect", "SELECT f.name, d.name FROM deployment d JOIN flow f ON f.id = d.flow_id")}
    assert deployments == {"tuneflow-finetune/on-demand", "tuneflow-sweep/on-demand", "tuneflow-retrain/scheduled",
                           "tuneflow-train/gpu"}
    tables = {name for (name,) in query(stack, "mlflow", "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"experiments", "runs", "metrics", "registered_models", "model_versions"} <= tables
    assert not list(stack.dir.rglob("*.db")) or all(p.name == "basic_auth.db" for p in stack.dir.rglob("*.db"))

    # Servers and Postgres listen on loopback only (STACK_HOST's default).
    addresses = listening(stack_processes(stack))
    assert {port for _, port in addresses} >= set(stack.ports.values())
    assert {ip for ip, _ in addresses} == {"127.0.0.1"}, addresses

    # A second `make stack` starts nothing new.
    before = sorted(p.pid for p in stack_processes(stack))
    again = make("stack", stack.dir, stack.env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "already running" in again.stdout and "starting" not in again.stdout, again.stdout
    assert sorted(p.pid for p in stack_processes(stack)) == before


def test_a_pipeline_run_through_the_stack_completes(stack, client, tmp_path):
    """`tuneflow submit --wait` from a shell that sourced the stack's env file: the pipeline on the cpu worker, its
    training on the gpu worker, the stages' progress and the held-out metrics printed."""
    import yaml
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    config = tiny_config(SimpleNamespace(hub=stack.hub), "stack")
    config["tracking"]["experiment"] = "stack"
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(config))
    env = {**stack.env, **client, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = subprocess.run([str(BIN / "tuneflow"), "submit", "--config", str(tmp_path / "stack.yaml"), "--wait"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    logs = "\n".join((stack.dir / "logs" / f"worker-{p}.log").read_text()[-4000:] for p in ("cpu", "gpu"))
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{output[-6000:]}\n{logs}"
    first = done.stdout.splitlines()[0]
    assert first.startswith("submitted flow run ") and f"of {PIPELINE}" in first and "tuneflow-train/gpu" in first
    assert f"{client['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/" in first, first
    for stage in STAGES:
        assert f"  {stage}: Completed" in done.stdout, done.stdout
    assert "    training run " in done.stdout, done.stdout  # the training flow run on the gpu pool, followed too
    assert "pipeline: Completed" in done.stdout and "eval_loss" in done.stdout, done.stdout
    assert "export parity 1.00  (models:/" in done.stdout, done.stdout  # the export as the workers left it: in MLflow
    assert f"MLflow: open {client['MLFLOW_TRACKING_URI']}/#/experiments/" in done.stdout, done.stdout
    assert not secrets_in(output, stack)
    with get_client(sync_client=True) as prefect:
        [run] = [r for r in prefect.read_flow_runs() if r.name == first.split()[3]]

    mlflow = MlflowClient()  # MLFLOW_TRACKING_URI and the credentials from the env file
    experiment = mlflow.get_experiment_by_name("stack")
    [parent] = mlflow.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    children = mlflow.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(STAGES)
    assert parent.info.status == "FINISHED" and {c.info.status for c in children} == {"FINISHED"}
    # The runs are rows in PostgreSQL; the artifacts went through the server into the stack folder.
    rows = query(stack, "mlflow", f"SELECT status FROM runs WHERE experiment_id = {int(experiment.experiment_id)}")
    assert sorted(rows) == [("FINISHED",)] * (len(STAGES) + 1)
    train = next(c for c in children if c.info.run_name == "train")
    assert train.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((stack.dir / "mlflow" / "artifacts").rglob("adapter_model.safetensors"))
    # Both workers took part: the pipeline on cpu, its training on gpu.
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs()
    assert {r.work_pool_name for r in runs if r.state.is_completed()} == {"cpu", "gpu"}

    for log in (stack.dir / "logs").glob("*.log"):
        assert not secrets_in(log.read_text(errors="replace"), stack), f"a credential in {log}"


def refused(cmd: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("who", ["worker", "run"])
def test_wrong_or_missing_credentials_stop_at_once_naming_the_server(stack, who):
    client = stack.client
    command = ([str(BIN / "tuneflow"), "worker", "--pool", "cpu"] if who == "worker"
               else [str(BIN / "tuneflow"), "run", "--config", "configs/demo.yaml"])
    cases = {
        "wrong Prefect auth string": ({"PREFECT_API_AUTH_STRING": "admin:not-the-password"}, client["PREFECT_API_URL"],
                                      "PREFECT_API_AUTH_STRING"),
        "no Prefect auth string": ({"PREFECT_API_AUTH_STRING": None}, client["PREFECT_API_URL"],
                                   "PREFECT_API_AUTH_STRING"),
        "wrong MLflow password": ({"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, client["MLFLOW_TRACKING_URI"],
                                  "MLFLOW_TRACKING_PASSWORD"),
        "no MLflow user": ({"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None},
                           client["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_USERNAME"),
    }
    for case, (change, server, setting) in cases.items():
        env = {**stack.env, **client, "PREFECT_HOME": str(stack.dir.parent / "client-prefect-home")}
        for key, value in change.items():
            env.pop(key) if value is None else env.__setitem__(key, value)
        done = refused(command, env)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and server in lines[0] and setting in lines[0], f"{case}: {done.stderr}"
        assert "Traceback" not in done.stdout + done.stderr, case
        assert "not-the-password" not in done.stdout + done.stderr, case
        assert not secrets_in(done.stdout + done.stderr, stack), case


def test_stack_stop_leaves_no_process_and_no_open_port(stack):
    procs = stack_processes(stack)
    assert len(procs) >= 5
    done = make("stack-stop", stack.dir, stack.env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, alive = psutil.wait_procs(procs, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    for port in stack.ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    assert not list((stack.dir / "pids").glob("*.pid"))
    assert not (stack.dir / "postgres/data/postmaster.pid").exists()
