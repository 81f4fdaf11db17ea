"""Stage 3, train: QLoRA (or LoRA / full / freeze) under torchrun + DeepSpeed, here or on a GPU work pool.

Without a deployment the attempt runs in this process's machine (`tuneflow.training.run.train_once`). With one
(`tuneflow-train/gpu`) each attempt is a flow run of that deployment on the `gpu` pool: this task waits for it,
fails with the training run's own error, cancels it when the pipeline is cancelled or the wait times out, and reads
its result from the stage's MLflow run. A failed attempt is relaunched up to train.retries times, anywhere in the
pool, resuming from the last checkpoint uploaded to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.context import RunContext
from tuneflow.config import TuneflowConfig
from tuneflow.results import DownloadResult, PrepareResult, TrainRequest, TrainResult

POLL_SECONDS = 5


class TrainingRunFailed(RuntimeError):
    """A training attempt that ended without a result; the message is the training run's own."""


def run_on_pool(deployment: str, request: TrainRequest, timeout_s: float, logger) -> TrainResult:
    """One attempt as a flow run of ``deployment``; raise TrainingRunFailed with its error if it does not complete."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from tuneflow.training.run import RESULT_ARTIFACT

    # timeout=0: create the run and return, so that this task can cancel it (run_deployment would only poll).
    child = run_deployment(deployment, parameters={"request": request.model_dump(mode="json")}, timeout=0,
                           as_subflow=True)
    logger.info("training runs as flow run %s of %s (pool %s)", child.name, deployment, child.work_pool_name)
    deadline, last = time.monotonic() + timeout_s, None
    with get_client(sync_client=True) as client:
        try:
            while True:
                child = client.read_flow_run(child.id)
                state = child.state
                if state.name != last:
                    logger.info("training run %s: %s", child.name, state.name)
                    last = state.name
                if state.is_final():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"training run {child.name} did not finish within train.timeout_hours="
                                       f"{timeout_s / 3600:g} (state {state.name}); it was cancelled")
                time.sleep(POLL_SECONDS)
        except BaseException:  # timeout, or this pipeline cancelled / interrupted: the training run stops too
            client.set_flow_run_state(child.id, Cancelling(message="the pipeline run stopped waiting"), force=True)
            raise
    if state.is_cancelled():  # by a person, on purpose: not retried
        raise RuntimeError(f"training run {child.name} was cancelled: {state.message or 'no message'}")
    if not state.is_completed():
        raise TrainingRunFailed(f"training run {child.name} {state.name}: {state.message or 'no message'}")
    path = MlflowClient(request.tracking_uri).download_artifacts(request.mlflow_run_id, RESULT_ARTIFACT)
    return TrainResult.model_validate(json.loads(Path(path).read_text()))


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: TuneflowConfig, downloaded: DownloadResult, prepared: PrepareResult, ctx: RunContext,
          deployment: str | None = None) -> TrainResult:
    from tuneflow.training.launcher import WorkerFailed
    from tuneflow.training.run import train_once

    logger = get_run_logger()
    with ctx.stage("train") as (client, run_id):
        request = TrainRequest(config=cfg, model=downloaded.model, data=prepared.data, tracking_uri=ctx.tracking_uri,
                               mlflow_run_id=run_id, run_folder=Path(ctx.run_dir).name)
        attempts = cfg.train.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                if deployment:
                    result = run_on_pool(deployment, request, cfg.train.timeout_hours * 3600, logger)
                else:
                    result = train_once(request, Path(ctx.run_dir) / "train", logger)
                break
            except (WorkerFailed, TrainingRunFailed) as exc:
                client.set_tag(run_id, f"attempt_{attempt}_error", str(exc)[:4000])
                if attempt == attempts:
                    raise
                logger.warning("train attempt %d failed: %s; relaunching from the last complete checkpoint",
                               attempt, exc)
        client.set_tag(run_id, "attempts", str(attempt))
        return result.model_copy(update={"attempts": attempt})
