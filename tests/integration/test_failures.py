"""A stage that fails leaves the truth everywhere: summary.json, the MLflow runs and the Prefect flow run."""

import json

import pytest
from mlflow import MlflowClient

from tuneflow.core.config import TuneflowConfig


@pytest.mark.slow
def test_failed_stage_is_failed_everywhere(prefect_api, tiny_assets, tmp_path):
    from flows.finetune import finetune

    # Valid rows (the download stage's checks pass), whose answers all lie past cutoff_len: prepare fails.
    bad = tmp_path / "long.json"
    bad.write_text(json.dumps([{"instruction": "Add 1 and 2. " * 40, "output": "3"}] * 6))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = TuneflowConfig.model_validate({
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_assets["model"])},
        "dataset": {"name_or_path": str(bad), "eval_size": 1},
        "prep": {"cutoff_len": 16},
        "tracking": {"uri": uri, "experiment": "failures"},
    })
    run_dir = tmp_path / "runs" / "failing"
    state = finetune(cfg, run_dir=str(run_dir), return_state=True)

    assert state.is_failed()
    message = "no train rows left: every answer lies past prep.cutoff_len=16"
    assert message in state.message

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_stage"] == "prepare"
    assert summary["stages"]["download"]["status"] == "completed"
    assert summary["stages"]["prepare"]["status"] == "failed"
    assert message in summary["stages"]["prepare"]["error"]
    assert summary["stages"]["train"]["status"] == "pending"

    client = MlflowClient(uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FAILED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name: r.info.status for r in children} == {"download": "FINISHED", "prepare": "FAILED"}
    failed_run = next(r for r in children if r.info.run_name == "prepare")
    assert summary["stages"]["prepare"]["mlflow_run_id"] == failed_run.info.run_id
