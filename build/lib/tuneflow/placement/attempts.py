"""The train stage's attempts: here, on the GPU pool, or as a TrainJob; a failed attempt is relaunched up to
train.retries times, resuming from the last checkpoint uploaded to MLflow."""

from __future__ import annotations

from pathlib import Path

from tuneflow.core.results import TrainRequest, TrainResult
from tuneflow.placement.pool import TrainingRunFailed, run_group_on_pool, run_on_pool, run_trainjob_on_pool


def train_attempts(request: TrainRequest, deployment: str | None, run_dir: Path, client, logger) -> TrainResult:
    """Run attempts until one completes; each failed one is tagged on the train run (``attempt_N_error``)."""
    from tuneflow.training.launch.launcher import WorkerFailed
    from tuneflow.training.launch.run import train_once

    cfg, run_id = request.config, request.mlflow_run_id
    attempts = cfg.train.retries + 1
    k8s_pool = None
    if deployment and cfg.train.nnodes > 1:
        from tuneflow.placement.kubernetes.trainjob import pool_settings

        k8s_pool = pool_settings(deployment)  # None unless the deployment's pool is of type kubernetes
    for attempt in range(1, attempts + 1):
        try:
            if k8s_pool is not None:
                result = run_trainjob_on_pool(k8s_pool, request, attempt, cfg.train.timeout_hours * 3600, logger)
            elif deployment and cfg.train.nnodes > 1:
                result = run_group_on_pool(deployment, request, f"{run_id}-{attempt}",
                                           cfg.train.timeout_hours * 3600, logger)
            elif deployment:
                result = run_on_pool(deployment, request, cfg.train.timeout_hours * 3600, logger)
            else:
                result = train_once(request, run_dir / "train", logger)
            break
        except (WorkerFailed, TrainingRunFailed) as exc:
            client.set_tag(run_id, f"attempt_{attempt}_error", str(exc)[:4000])
            if attempt == attempts:
                raise
            logger.warning("train attempt %d failed: %s; relaunching from the last complete checkpoint",
                           attempt, exc)
    client.set_tag(run_id, "attempts", str(attempt))
    return result.model_copy(update={"attempts": attempt})
