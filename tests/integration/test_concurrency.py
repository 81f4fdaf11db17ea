"""Re-running is safe: two `tuneflow run` of one config at the same time, sharing the Hub cache, the output folder,
the tuneflow cache (prepared data) and the MLflow server, each finish in their own run folder and MLflow run; a
third run reuses the downloaded snapshot and the prepared dataset (and its MLflow artifact), and says so."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow
TUNEFLOW = Path(sys.executable).parent / "tuneflow"


def start(config: Path, env: dict, cwd: Path, *overrides: str) -> subprocess.Popen:
    args = [str(TUNEFLOW), "run", "--config", str(config)] + [f"--set={o}" for o in overrides]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"tuneflow run exited {proc.returncode}\n{out[-3000:]}\n{err[-6000:]}"
    return json.loads(Path(out.strip().splitlines()[-1]).read_text()), err


def test_concurrent_runs_and_cache_reuse(tmp_path, hub_mirror, prefect_api, mlflow_server):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": "same",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": hub_mirror.model_id},
        "dataset": {"name_or_path": hub_mirror.dataset_id, "eval_size": 8},
        "prep": {"cutoff_len": 128},
        "train": {"max_steps": 4, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                  "deepspeed": "none", "nproc_per_node": 1, "save_steps": 2, "retries": 0},
        "eval": {"max_samples": 8, "max_new_tokens": 8, "batch_size": 8, "compare_base": False},
        "export": {"max_shard_size": "300KB", "parity_samples": 2},
        "tracking": {"uri": mlflow_server, "experiment": "concurrency"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_", "TUNEFLOW_"))}
    env.update(HF_ENDPOINT=hub_mirror.endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), PREFECT_API_URL=prefect_api,
               TUNEFLOW_CACHE=str(tmp_path / "tuneflow-cache"),
               HF_HUB_DISABLE_PROGRESS_BARS="1")

    first, second = start(config, env, tmp_path), start(config, env, tmp_path)
    (a, _), (b, _) = finish(first), finish(second)
    assert a["status"] == b["status"] == "completed"
    assert a["run_dir"] != b["run_dir"] and a["mlflow"]["parent_run_id"] != b["mlflow"]["parent_run_id"]
    for summary in (a, b):
        run_dir = Path(summary["run_dir"])
        assert summary["lineage"]["model_revision"] == hub_mirror.model_sha
        assert Path(summary["export_dir"]).parent == run_dir and Path(summary["adapter_dir"]).is_relative_to(run_dir)
        assert json.loads((run_dir / "config.json").read_text())["run_name"] == "same"
    # One prepared entry, reached by both; nothing half-written left behind in the shared caches.
    prepared = tmp_path / "tuneflow-cache" / "prepared"
    assert len([p for p in prepared.iterdir() if p.is_dir()]) == 1, list(prepared.iterdir())  # no .partial either
    assert not list(prepared.glob(".*partial")) and not list((tmp_path / "hf-cache").rglob("*.incomplete"))

    client = MlflowClient(mlflow_server)
    for summary in (a, b):
        parent = client.get_run(summary["mlflow"]["parent_run_id"])
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert parent.info.status == "FINISHED" and len(children) == 5
        assert {c.info.status for c in children} == {"FINISHED"}
        assert {c.info.run_id for c in children} == {s["mlflow_run_id"] for s in summary["stages"].values()}

    third, log = finish(start(config, env, tmp_path, "export.enabled=false"))
    assert third["stages"]["prepare"]["cache_hit"] is True
    assert "prepare: reusing the tokenized dataset" in log
    assert "prepare: the same data is already logged as runs:/" in log  # not uploaded again
    assert f"model {hub_mirror.model_id}@{hub_mirror.model_sha}: all" in log and "nothing to download" in log
    assert len({a["run_dir"], b["run_dir"], third["run_dir"]}) == 3
