"""Stage 3, train: QLoRA (or LoRA / full / freeze) under torchrun + DeepSpeed, here or on a GPU work pool.

Without a deployment the attempt runs in this process's machine (`tuneflow.training.launch.run.train_once`). With one
(`tuneflow-train/gpu`) each attempt is a flow run of that deployment on the `gpu` pool, or train.nnodes of them meeting
under a rendezvous id, or one Kubeflow TrainJob when that pool is of type kubernetes (`tuneflow.placement.pool`).
A failed attempt is relaunched up to train.retries times, resuming from the last checkpoint in MLflow
(`tuneflow.placement.attempts`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.results import DownloadResult, PrepareResult, TrainRequest, TrainResult
from tuneflow.tracking.context import RunContext


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: TuneflowConfig, downloaded: DownloadResult, prepared: PrepareResult, ctx: RunContext,
          deployment: str | None = None) -> TrainResult:
    from tuneflow.placement.attempts import train_attempts

    with ctx.stage("train") as (client, run_id):
        request = TrainRequest(config=cfg, model=downloaded.model, data=prepared.data, tracking_uri=ctx.tracking_uri,
                               mlflow_run_id=run_id, run_folder=Path(ctx.run_dir).name)
        return train_attempts(request, deployment, Path(ctx.run_dir), client, get_run_logger())
