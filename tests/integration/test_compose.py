"""The Compose stack for real, as a team behind an air gap runs it: `make images OFFLINE=1` (every image built from a
Debian base made here with debootstrap: no registry), `make compose-demo` (the stack up on a project of its own, the
demo pipeline submitted from this host and run by the containers), authentication and publishing checked from the
host, the export fetched from MLflow, `make compose-down` then up again with the registry and artifacts intact, and
`make compose-down VOLUMES=1` removing them.

The stack runs under Compose v2 (`docker compose`, what README gives users): the Docker CLI's own plugin, else the
v2 binary `make test` keeps in .compose-v2 (TUNEFLOW_COMPOSE_V2), given to this test's Docker CLI alone through a
DOCKER_CONFIG of its own. Debian's docker-compose 1.29 (v1) resolves the same files, overrides included.
Needs Docker's engine (Debian's docker.io), both Composes and debootstrap; `make test` installs them when missing. A
running engine is used; otherwise the test starts dockerd and stops it afterwards. Images and the base stay in the
engine's cache for the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
from dotenv import dotenv_values

from infra.compose import Stack, client_env, compose_command
from tuneflow.core.ports import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SECRET = re.compile(r"PASSWORD|SECRET|AUTH_STRING")
DEMO_SET = ["train.max_steps=12", "train.save_steps=6", "eval.max_samples=8", "export.parity_samples=4"]


def engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def find_compose_v1() -> str | None:
    """Debian's docker-compose 1.x on PATH (a `docker-compose` there may be a v2 build)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        tool = Path(folder) / "docker-compose"
        if tool.is_file() and subprocess.run([str(tool), "version", "--short"], capture_output=True,
                                             text=True).stdout.startswith("1."):
            return str(tool)
    return None


@pytest.fixture(scope="module")
def compose_v1(tmp_path_factory):
    """A Docker engine (the one running, else dockerd started here as root and stopped afterwards) whose CLI has
    Compose v2. Yields the path of Compose v1."""
    missing = [tool for tool in ("docker", "dockerd", "debootstrap") if not shutil.which(tool)]
    v1 = find_compose_v1()
    if missing or not v1:
        pytest.fail(f"missing {missing or ['docker-compose 1.x']}: apt-get install -y docker.io docker-compose "
                    "debootstrap (make test does)")
    with pytest.MonkeyPatch.context() as env:
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
            plugin = Path(os.environ.get("TUNEFLOW_COMPOSE_V2", "/nonexistent"))
            if not plugin.is_file():
                pytest.fail("no Compose v2: `docker compose` is not a command and TUNEFLOW_COMPOSE_V2 names no "
                            "binary (make test installs one)")
            config = tmp_path_factory.mktemp("docker-config")
            (config / "cli-plugins").mkdir()
            (config / "cli-plugins" / "docker-compose").symlink_to(plugin.resolve())
            env.setenv("DOCKER_CONFIG", str(config))
        compose_command.cache_clear()
        assert compose_command() == ["docker", "compose"]
        with engine():
            yield v1
    compose_command.cache_clear()


@contextlib.contextmanager
def engine():
    """The engine that answers, else dockerd started here and stopped afterwards."""
    if engine_answers():
        yield
        return
    log = Path(tempfile.mkdtemp(prefix="dockerd-")) / "dockerd.log"
    proc = subprocess.Popen(["dockerd"], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while not engine_answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"dockerd did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def make(target: str, env: dict, *args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(["make", "-C", str(REPO), target, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - start


def http_status(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_compose_stack_built_offline_runs_the_demo_and_keeps_its_data(compose_v1, tmp_path, monkeypatch):
    project = f"tuneflow-test-{secrets.token_hex(3)}"
    env_file = tmp_path / "compose.env"  # written by `make images`, with the settings below and random secrets
    stack = Stack(project, env_file)
    keep = ("PATH", "HOME", "LANG", "PIP_CERT", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT", "DEBIAN_MIRROR",
            "DOCKER_CONFIG")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_PORT=str(free_port()),
               MLFLOW_PORT=str(free_port()), PREFECT_WORKER_QUERY_SECONDS="2", GPU_WORKER_SHM_SIZE="1gb")
    args = ("OFFLINE=1", f"COMPOSE_PROJECT={project}", f"COMPOSE_ENV={env_file}")
    timings = {}
    try:
        done, timings["images"] = make("images", env, *args)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert f"wrote {env_file} with random secrets" in done.stdout and env_file.stat().st_mode & 0o777 == 0o600
        client = client_env(env_file)
        assert client["PREFECT_API_URL"] == f"http://127.0.0.1:{env['PREFECT_PORT']}/api"
        written = dotenv_values(env_file)
        assert written["COMPOSE_PROJECT_NAME"] == project and written["POSTGRES_IMAGE"] == "tuneflow-postgres:15"
        values = [v.split(":")[-1] for k, v in written.items() if SECRET.search(k) and v]
        assert len(values) >= 6, written.keys()
        # Every image is built on the base made here (no registry was asked): its layers come first.
        base = image_layers("tuneflow-base:bookworm")
        for image in ("tuneflow-cpu:latest", "tuneflow-mlflow:3.17.2", "tuneflow-postgres:15"):
            assert image_layers(image)[:len(base)] == base, image
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, client[key])
        # Compose v1 takes the same files; the overrides for GPU hosts and MinIO resolve in both (they cannot run
        # here: no GPU, no MinIO).
        for files in ((), ("compose.gpu.yaml",), ("compose.minio.yaml",)):
            v2 = Stack(project, env_file, tuple(REPO / "infra" / f for f in files)).command("config")
            for command in (v2, [compose_v1, *v2[2:]]):
                config = subprocess.run(command, capture_output=True, text=True, cwd=REPO / "infra")
                assert config.returncode == 0, (command, config.stderr)

        done, timings["compose-demo"] = make("compose-demo", env, *args, f"COMPOSE_ARGS=--set {' '.join(DEMO_SET)}")
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-8000:] + "\n".join(stack.logs(s) for s in ("cpu-worker", "gpu-worker"))
        for stage in ("download", "prepare", "train", "evaluate", "export"):
            assert f"  {stage}: Completed" in done.stdout, done.stdout
        assert "    training run " in done.stdout and "pipeline: Completed" in done.stdout, done.stdout
        assert re.search(r"held-out metrics \(base -> tuned\):\n  eval_loss +[0-9.]+ -> [0-9.]+\n", done.stdout), \
            done.stdout
        model_uri = re.search(r"export parity [0-9.]+\s+\((models:/[^)\s]+)\)", done.stdout)
        assert model_uri, done.stdout
        assert "the stack stays up" in done.stdout
        assert f"MLflow: open {client['MLFLOW_TRACKING_URI']}/#/experiments/" in done.stdout, done.stdout
        assert not [v for v in values if v in output], "a secret in make compose-demo's output"

        # Only Prefect and MLflow are published, on 127.0.0.1; both refuse requests without credentials.
        published = {(service, binding["HostIp"], port)
                     for service, c in stack.containers().items()
                     for port, bindings in (c["NetworkSettings"]["Ports"] or {}).items() for binding in bindings or []}
        assert {(s, ip) for s, ip, _ in published} == {("prefect", "127.0.0.1"), ("mlflow", "127.0.0.1")}, published
        prefect, mlflow = client["PREFECT_API_URL"], client["MLFLOW_TRACKING_URI"]
        prefect_auth = tuple(client["PREFECT_API_AUTH_STRING"].split(":", 1))
        mlflow_auth = (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"])
        assert http_status(f"{prefect}/deployments/filter", data=b"{}") == 401
        assert http_status(f"{prefect}/deployments/filter", ("admin", "wrong"), data=b"{}") == 401
        assert http_status(f"{prefect}/deployments/filter", prefect_auth, data=b"{}") == 200
        search = f"{mlflow}/api/2.0/mlflow/registered-models/search"
        assert http_status(search) == 401 and http_status(search, ("admin", "wrong")) == 401
        assert http_status(search, mlflow_auth) == 200

        # The export, fetched on this host through MLflow (the containers' volume behind it), generates.
        fetched = fetch_model(model_uri[1], client, tmp_path / "export")
        before = tracked(client)
        runs, models = before["tuneflow-demo"]
        assert sorted(name for name, _, _ in runs if not name.startswith("demo-")) == \
            ["download", "evaluate", "export", "prepare", "train"] and {s for _, s, _ in runs} == {"FINISHED"}, runs
        assert model_uri[1].removeprefix("models:/") in models, models

        # `make compose-down` keeps the volumes; `docker compose up` again with nothing but the env file (this
        # process has none of the make's settings) finds the runs, the logged models and the artifacts.
        done, _ = make("compose-down", env, *args)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert not stack.containers() and len(volumes(project)) == 4
        start = time.monotonic()
        stack.up()
        timings["restart"] = time.monotonic() - start
        mounts = {m["Source"] for m in stack.containers()["gpu-worker"]["Mounts"]}
        assert str(REPO / "demo") in mounts, mounts
        assert tracked(client) == before
        again = fetch_model(model_uri[1], client, tmp_path / "export-again")
        weights = sorted(fetched.glob("*.safetensors"))
        assert weights and [w.read_bytes() for w in weights] == \
            [w.read_bytes() for w in sorted(again.glob("*.safetensors"))]

        done, _ = make("compose-down", env, *args, "VOLUMES=1")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert not stack.containers() and not volumes(project)
    finally:
        took = json.dumps({k: round(v) for k, v in timings.items()})
        print(f"compose timings (s): {took}")
        (tmp_path / "timings.json").write_text(took)  # pytest keeps the last runs' tmp_path folders
        if stack.containers() or volumes(project):
            stack.down(volumes=True)


def fetch_model(uri: str, client: dict, cache: Path) -> Path:
    """`tuneflow generate --model models:/…` on this host: the export downloaded through MLflow (into ``cache``)
    answers a prompt. Returns the model's folder."""
    env = {**os.environ, **client, "TUNEFLOW_CACHE": str(cache)}
    done = subprocess.run([str(BIN / "tuneflow"), "generate", "--model", uri, "--prompt", "Name a colour.",
                           "--max-new-tokens", "8"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stdout[-2000:] + done.stderr[-3000:]
    [folder] = (cache / "models").iterdir()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file(), sorted(folder.iterdir())
    return folder


def tracked(client: dict) -> dict:
    """Experiment -> its runs (name, status, metrics) and logged models, as this host sees them through MLflow."""
    from mlflow import MlflowClient

    mlflow = MlflowClient(client["MLFLOW_TRACKING_URI"])  # the credentials: from the environment (monkeypatch)
    return {e.name: [sorted((r.info.run_name, r.info.status, sorted(r.data.metrics.items()))
                            for r in mlflow.search_runs([e.experiment_id])),
                     sorted(m.model_id for m in mlflow.search_logged_models([e.experiment_id]))]
            for e in mlflow.search_experiments()}


def image_layers(image: str) -> list[str]:
    found = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RootFS.Layers}}", image],
                           capture_output=True, text=True, check=True).stdout
    return json.loads(found)


def volumes(project: str) -> list[str]:
    return subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True, check=True).stdout.split()
