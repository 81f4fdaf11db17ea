"""Shared, session-scoped test infrastructure: started once, on first use, and stopped at the end.

- ``tiny_assets``:   a tiny random Llama + tokenizer (with chat template) and an alpaca train.json
(tuneflow.modeling.demo)
- ``hub_mirror``:    a local Hugging Face Hub (olah, offline mirror mode) serving them as
                     ``tiny-org/tiny-llama`` (model) and ``tiny-org/tiny-instruct`` (dataset), plus broken
                     variants of the model (no chat template, pickle weights only, custom code)
- ``prefect_api``:   a ``prefect server start`` (own PREFECT_HOME, SQLite, the UI); its API URL
- ``tuneflow_cache``: $TUNEFLOW_CACHE for the whole session (a temporary folder)
- ``mlflow_server``: a real ``mlflow server`` (SQLite backend, proxied artifacts); its URL
- ``chromium``:      Debian's Chromium for the UI tests (driven with Playwright)

Nothing here reads outside the pytest temp folders and the repository.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.multiple_choice import hub_folder
from tests.support.servers import add_repo, olah_server, prefect_server
from tests.support.servers import mlflow_server as start_mlflow


@pytest.fixture(scope="session", autouse=True)
def tuneflow_cache(tmp_path_factory) -> Path:
    """Prepared data and downloaded artifacts go to a folder of this session, never to ~/.cache/tuneflow."""
    folder = tmp_path_factory.mktemp("tuneflow-cache")
    os.environ["TUNEFLOW_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """{"model": folder, "data": train.json} built once per session."""
    from tuneflow.modeling.demo import build

    return build(tmp_path_factory.mktemp("tiny-assets"), n_rows=240)


@dataclass(frozen=True)
class HubMirror:
    endpoint: str  # for HF_ENDPOINT
    model_id: str
    model_sha: str
    dataset_id: str
    dataset_sha: str
    broken: dict[str, str] = field(default_factory=dict)  # what is wrong -> model repo id
    mirror: Path | None = None  # the repos' folder: a test that needs a new commit adds one (servers.add_repo)
    mc_id: str = ""  # a multiple-choice set in MMLU's layout, as a dataset repo (eval.benchmarks)
    mc_sha: str = ""


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
    mc_sha = add_repo(mirror, "dataset", "tiny-org/tiny-mc", hub_folder(tmp_path_factory.mktemp("tiny-mc")))
    variants = tmp_path_factory.mktemp("broken-models")
    broken = {}
    for fault in ("no-chat-template", "pickle-only", "custom-code"):
        broken[fault] = f"tiny-org/{fault}"
        add_repo(mirror, "model", broken[fault], broken_model(tiny_assets["model"], variants / fault, fault))
    with olah_server(mirror) as endpoint:
        yield HubMirror(endpoint, "tiny-org/tiny-llama", model_sha, "tiny-org/tiny-instruct", dataset_sha, broken,
                        mirror, "tiny-org/tiny-mc", mc_sha)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """PREFECT_API_URL of a `prefect server start` for the session; in-process flows use it too."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        with temporary_settings({PREFECT_API_URL: url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            yield url
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # this process's flow logs reach the server before it stops


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """The tracking URI of an ``mlflow server`` with a SQLite store and artifacts proxied by the server."""
    with start_mlflow(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


INSTALL = ("install them with `make test` (it installs both), or by hand: "
           "`.venv/bin/pip install playwright` (the Python package only; `playwright install` is not needed) "
           "and `apt-get install -y chromium` (Debian's Chromium at /usr/bin/chromium)")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser: $TUNEFLOW_CHROMIUM, else `chromium` on PATH (Debian's /usr/bin/chromium). Missing it, or the
    playwright package, fails the test (never skips it), before any server starts."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(f"the Python package `playwright` is missing: {INSTALL}", pytrace=False)
    path = os.environ.get("TUNEFLOW_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"Chromium is missing (looked for {path}; set TUNEFLOW_CHROMIUM to use another): {INSTALL}",
                    pytrace=False)
    return path
