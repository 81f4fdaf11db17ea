"""`tuneflow submit` refuses, in one line and before anything is created, what cannot run on the team's server.

The happy path (submitted through `make stack`, followed with --wait to the metrics) is in
tests/integration/test_stack.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TUNEFLOW = Path(sys.executable).parent / "tuneflow"


def submit(tmp_path: Path, *args: str, api: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile of this machine's user
    if api:
        env["PREFECT_API_URL"] = api
    return subprocess.run([str(TUNEFLOW), "submit", "--config", "configs/demo.yaml", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def one_line_refusal(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "submitted" not in done.stdout, done.stdout + done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("tuneflow: ")]
    return line


def test_without_a_prefect_server_it_says_what_to_set(tmp_path):
    line = one_line_refusal(submit(tmp_path))
    assert "PREFECT_API_URL" in line and ".stack/env" in line and "tuneflow run" in line, line


def test_an_unknown_deployment_is_named_with_the_command_that_registers_it(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        before = len(client.read_flow_runs())
    line = one_line_refusal(submit(tmp_path, "--deployment", "tuneflow-finetune/no-such", api=prefect_api))
    assert "no deployment tuneflow-finetune/no-such" in line and "make deploy" in line, line
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == before  # nothing was created


def test_several_nodes_without_the_training_deployment_are_refused(tmp_path, prefect_api):
    line = one_line_refusal(submit(tmp_path, "--set", "train.nnodes=2", "--train-deployment", "", api=prefect_api))
    assert "train.nnodes=2" in line and "tuneflow-train/gpu" in line, line


def test_local_paths_of_every_source_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Workers of `make stack` share this machine but not its working folder: every local path the config names
    (the model, each of datasets, eval_dataset, an adapter to start from) reaches them absolute; Hub ids stay."""
    from tuneflow.cli.remote import portable
    from tuneflow.core.loading import load_config

    for name in ("a.json", "eval.json", "model", "sft-adapter"):
        (tmp_path / name).mkdir() if "." not in name else (tmp_path / name).write_text("[]")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(data={"model": {"name_or_path": "model"},
                            "datasets": [{"name_or_path": "a.json", "format": "preference"},
                                         {"name_or_path": "org/pairs", "format": "preference"}],
                            "eval_dataset": {"name_or_path": "eval.json", "format": "preference"},
                            "train": {"objective": "dpo", "preference": {"init_adapter": "sft-adapter"}}})
    data, notes = portable(cfg)
    assert data["model"]["name_or_path"] == str(tmp_path / "model")
    assert [d["name_or_path"] for d in data["datasets"]] == [str(tmp_path / "a.json"), "org/pairs"]
    assert data["eval_dataset"]["name_or_path"] == str(tmp_path / "eval.json")
    assert data["train"]["preference"]["init_adapter"] == str(tmp_path / "sft-adapter")
    assert f"datasets.0 a.json is a local path: the workers read {tmp_path / 'a.json'}" in notes
