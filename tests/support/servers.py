"""Real servers on loopback for the tests: a local Hugging Face Hub (olah), a Prefect server and an MLflow server.

The Hub: git repos served by olah in offline mirror mode.

olah (https://github.com/vtuber-plan/olah, PyPI ``olah``) serves git repos laid out as
``<mirror>/models/<org>/<name>`` and ``<mirror>/datasets/<org>/<name>`` with the Hub's HTTP API, so
``huggingface_hub.snapshot_download`` works against it unchanged once ``HF_ENDPOINT`` points at it, and the
snapshot folder is named after the git commit SHA of the served revision.

    from tests.support.servers import add_repo, olah_server

    sha = add_repo(mirror, "model", "tiny-org/tiny-llama", "demo/assets/model")
    with olah_server(mirror) as endpoint:            # http://127.0.0.1:<free port>
        os.environ["HF_ENDPOINT"] = endpoint         # before huggingface_hub is imported (or in a subprocess)

olah needs a newer fastapi than prefect tolerates, so it runs from its own virtual environment, by default
``.venv-olah/`` at the repository root (override with ``TUNEFLOW_OLAH_VENV``):

    python3 -m venv .venv-olah && .venv-olah/bin/pip install olah
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from tuneflow.core.ports import free_port

VENV_BIN = Path(sys.executable).parent  # the project virtualenv's bin (prefect, mlflow, tuneflow)

REPO_ROOT = Path(__file__).resolve().parents[2]
OLAH_VENV_ENV = "TUNEFLOW_OLAH_VENV"
REPO_TYPES = {"model": "models", "dataset": "datasets"}


class OlahUnavailable(RuntimeError):
    """olah's virtual environment is missing, or the server did not start."""


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {repo} failed:\n{done.stderr.strip()}")
    return done.stdout.strip()


def add_repo(mirror: str | Path, repo_type: str, repo_id: str, source: str | Path, message: str = "upload") -> str:
    """Commit the files of ``source`` (a folder, or one file) to branch ``main`` of the mirror repo for
    ``repo_id`` (``org/name``); ``repo_type`` is ``model`` or ``dataset``. Returns the commit SHA.

    The repo is created if needed; calling it again adds a new commit on top (the SHA changes)."""
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {sorted(REPO_TYPES)}, not {repo_type!r}")
    if repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be 'org/name', not {repo_id!r}")
    repo = Path(mirror) / REPO_TYPES[repo_type] / repo_id
    source = Path(source)
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "--quiet", "--initial-branch=main")
        _git(repo, "config", "user.name", "tuneflow tests")
        _git(repo, "config", "user.email", "tests@tuneflow.invalid")
        _git(repo, "config", "commit.gpgsign", "false")
    if source.is_dir():
        shutil.copytree(source, repo, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
    else:
        shutil.copy2(source, repo / source.name)
    _git(repo, "add", "--all")
    _git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def olah_bin() -> Path:
    """The olah-cli of olah's own virtual environment; a clear error if it is not installed."""
    venv = Path(os.environ.get(OLAH_VENV_ENV) or REPO_ROOT / ".venv-olah")
    cli = venv / "bin" / "olah-cli"
    if not cli.is_file():
        raise OlahUnavailable(
            f"olah is not installed in {venv} (it needs its own virtualenv: a newer fastapi than prefect allows). "
            f"Install it with:  python3 -m venv {venv} && {venv}/bin/pip install olah   "
            f"(or set {OLAH_VENV_ENV} to a virtualenv that has it)"
        )
    return cli


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server process, and kill it if it does not exit in ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers with any HTTP status; raise OlahUnavailable on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError):
            pass
        output = log.read_text(errors="replace")[-3000:] if log and log.is_file() else ""
        if proc is not None and proc.poll() is not None:
            raise OlahUnavailable(f"{url}: the server exited with code {proc.returncode}:\n{output}")
        if time.monotonic() > deadline:
            raise OlahUnavailable(f"{url} did not answer within {timeout:.0f}s:\n{output}")
        time.sleep(0.2)


def write_config(path: Path, mirror: Path, port: int, repos: Path) -> None:
    """olah's TOML config (keys from olah/configs.py): offline, serving only the git repos under ``mirror``."""
    path.write_text(
        "[basic]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f'repos-path = "{repos.as_posix()}"\n'  # olah's own cache; unused offline but kept out of the cwd
        'hf-scheme = "http"\n'  # never contacted: offline
        'hf-netloc = "127.0.0.1:9"\n'
        'hf-lfs-netloc = "127.0.0.1:9"\n'
        f'mirrors-path = ["{mirror.as_posix()}"]\n'
        "\n"
        "[accessibility]\n"
        "offline = true\n"
    )


def start_olah(mirror: Path, work: Path, port: int) -> subprocess.Popen:
    """Start olah serving ``mirror`` on ``port``, its config, cache and logs under ``work``; wait until it answers."""
    config = work / "olah.toml"
    write_config(config, Path(mirror).resolve(), port, work / "repos")
    log = work / "olah.out"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(olah_bin()), "--config", str(config), "--log-path", str(work / "logs")],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/", 60, proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


@contextlib.contextmanager
def olah_server(mirror: str | Path) -> Iterator[str]:
    """Serve ``mirror`` with olah on a free loopback port; yields the endpoint URL (for HF_ENDPOINT).

    The config, olah's cache and its logs live in a temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="olah-") as tmp:
        port = free_port()
        proc = start_olah(Path(mirror), Path(tmp), port)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)


@contextlib.contextmanager
def serve(cmd: list[str], folder: Path, health_url: str, env: dict | None = None,
          timeout: float = 180) -> Iterator[None]:
    """Run a server in ``folder`` (its log: folder/server.log) until it answers ``health_url``; stop it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_http(health_url, timeout, proc, log)
        yield
    finally:
        stop(proc)


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite there); yields the API URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # The UI finds the API through PREFECT_SERVER_API_PORT (default 4200), not through --port.
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="true",
               PREFECT_SERVER_API_PORT=str(port))
    cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with serve(cmd, home, f"http://127.0.0.1:{port}/api/health", env, timeout=120):
        yield f"http://127.0.0.1:{port}/api"


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` with a SQLite store and artifacts proxied by the server (stored under root/artifacts)."""
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    with serve(cmd, root, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}"


def training_rank_pid(rank: int, in_cmdline: str = "", in_environ: str = "") -> int | None:
    """The pid of a running training worker process of global ``rank`` whose command line / environment contain
    the given text (to tell one run, or one machine, from another)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"tuneflow.training.worker" in cmd and in_cmdline.encode() in cmd and f"RANK={rank}".encode() in env
                and (not in_environ or in_environ.encode() in env)):
            return int(pid)
    return None


@contextlib.contextmanager
def openai_server(folder: Path) -> Iterator[str]:
    """`transformers serve`, an OpenAI-compatible chat endpoint (as vLLM is) serving any local model folder named in
    a request; yields its base URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(VENV_BIN / "transformers"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with serve(cmd, folder, f"http://127.0.0.1:{port}/health", env, timeout=120):
        yield f"http://127.0.0.1:{port}/v1"
