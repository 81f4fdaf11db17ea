"""Shared, session-scoped test infrastructure: started once, on first use, and stopped at the end.

- ``tiny_assets``:   a tiny random Llama + tokenizer (with chat template) and an alpaca train.json (infra.tiny)
- ``hub_mirror``:    a local Hugging Face Hub (olah, offline mirror mode) serving them as
                     ``tiny-org/tiny-llama`` (model) and ``tiny-org/tiny-instruct`` (dataset), plus broken
                     variants of the model (no chat template, pickle weights only, custom code)
- ``prefect_api``:   Prefect's test harness (a temporary ephemeral API server, ~15 s to start); its URL
- ``mlflow_server``: a real ``mlflow server`` (SQLite backend, proxied artifacts); its URL

Nothing here reads outside the pytest temp folders and the repository.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infra.hub_mirror import add_repo, olah_server, stop, wait_http
from infra.launcher import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the project virtualenv's bin (mlflow, tuneflow)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """{"model": folder, "data": train.json} built once per session."""
    from infra.tiny import build

    return build(tmp_path_factory.mktemp("tiny-assets"), n_rows=240)


@dataclass(frozen=True)
class HubMirror:
    endpoint: str  # for HF_ENDPOINT
    model_id: str
    model_sha: str
    dataset_id: str
    dataset_sha: str
    broken: dict[str, str] = field(default_factory=dict)  # what is wrong -> model repo id


def broken_model(model: Path, out: Path, fault: str) -> Path:
    """A copy of the tiny model with one thing wrong, as found on the Hub."""
    shutil.copytree(model, out)
    if fault == "no-chat-template":
        (out / "chat_template.jinja").unlink(missing_ok=True)
        tok = json.loads((out / "tokenizer_config.json").read_text())
        tok.pop("chat_template", None)
        (out / "tokenizer_config.json").write_text(json.dumps(tok))
    elif fault == "pickle-only":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    elif fault == "custom-code":
        config = json.loads((out / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
        (out / "config.json").write_text(json.dumps(config))
        (out / "modeling_tiny.py").write_text("raise RuntimeError('remote code ran')\n")
    return out


@pytest.fixture(scope="session")
def hub_mirror(tiny_assets, tmp_path_factory) -> HubMirror:
    mirror = tmp_path_factory.mktemp("hub-mirror")
    model_sha = add_repo(mirror, "model", "tiny-org/tiny-llama", tiny_assets["model"])
    dataset_sha = add_repo(mirror, "dataset", "tiny-org/tiny-instruct", tiny_assets["data"])
    variants = tmp_path_factory.mktemp("broken-models")
    broken = {}
    for fault in ("no-chat-template", "pickle-only", "custom-code"):
        broken[fault] = f"tiny-org/{fault}"
        add_repo(mirror, "model", broken[fault], broken_model(tiny_assets["model"], variants / fault, fault))
    with olah_server(mirror) as endpoint:
        yield HubMirror(endpoint, "tiny-org/tiny-llama", model_sha, "tiny-org/tiny-instruct", dataset_sha, broken)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """PREFECT_API_URL of a temporary Prefect server (in-process flows use it too while the session runs)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):  # no telemetry calls from the sandbox
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The tracking URI of an ``mlflow server`` with a SQLite store and artifacts proxied by the server."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
            cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", timeout=180, proc=proc, log=log)
        yield uri
    finally:
        stop(proc)
