"""MLflow runs owned by the flow: one parent per flow run, one child per stage.

Training processes attach to their stage's run through MLFLOW_RUN_ID instead of starting runs of their own, so a
multi-process job still leaves exactly one run per stage. Every run ends FINISHED or FAILED, never RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LEN = 6000


def tracking_uri(configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by a concurrent flow
        return client.get_experiment_by_name(name).experiment_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, object]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


@contextlib.contextmanager
def child_run(client: MlflowClient, exp_id: str, parent_run_id: str, name: str) -> Iterator[str]:
    """A stage's run under the flow's parent run; FAILED if the block raises."""
    run = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, "tuneflow.stage": name})
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """Where the run shows in the MLflow UI (for a local store: once `mlflow ui` serves it on port 5000)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"
