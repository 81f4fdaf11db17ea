"""Stage 3, train: QLoRA (or LoRA / full / freeze) under torchrun + DeepSpeed, in a subprocess.

The task writes <run>/train/spec.json (the config and the folders), launches `tuneflow.worker.train` on N processes,
streams their output into the Prefect logs and attaches them to this stage's MLflow run through MLFLOW_RUN_ID.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from infra.launcher import WorkerFailed, launch, resolve_nproc
from tasks.context import RunContext
from tasks.download import DownloadResult
from tasks.prepare import PrepareResult
from tuneflow.config import TuneflowConfig
from tuneflow.tracking import log_params

class TrainResult(BaseModel):
    weights_dir: str
    global_step: int
    train_loss: float
    resumed_from_step: int | None
    nproc: int
    mlflow_run_id: str


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: TuneflowConfig, downloaded: DownloadResult, prepared: PrepareResult, ctx: RunContext) -> TrainResult:
    logger = get_run_logger()
    out = Path(ctx.run_dir) / "train"
    out.mkdir(parents=True, exist_ok=True)
    nproc = resolve_nproc(cfg.train.nproc_per_node)
    spec = out / "spec.json"
    spec.write_text(json.dumps({
        "config": cfg.model_dump(mode="json"),
        "model_dir": downloaded.model.path,
        "data_dir": prepared.data_dir,
        "output_dir": str(out),
    }, indent=1))
    with ctx.stage("train") as (client, run_id):
        log_params(client, run_id, {"nproc": nproc, "deepspeed": cfg.train.deepspeed, "method": cfg.train.method})
        env = {"MLFLOW_TRACKING_URI": ctx.tracking_uri, "MLFLOW_RUN_ID": run_id, "TOKENIZERS_PARALLELISM": "false"}
        for attempt in range(1, cfg.train.retries + 2):
            try:
                launch(spec, nproc, cfg.train.master_port, env, on_line=logger.info, nnodes=cfg.train.nnodes,
                       node_rank=cfg.train.node_rank, master_addr=cfg.train.master_addr)
                break
            except WorkerFailed as exc:
                client.set_tag(run_id, f"attempt_{attempt}_error", str(exc)[:4000])
                if attempt > cfg.train.retries:
                    raise
                logger.warning("train attempt %d failed: %s; relaunching from the last complete checkpoint",
                               attempt, exc)
        result = json.loads((out / "result.json").read_text())
        if (out / "loss_curve.png").is_file():
            client.log_artifact(run_id, str(out / "loss_curve.png"))
        if result["resumed_from_step"] is not None:
            client.set_tag(run_id, "resumed_from_step", str(result["resumed_from_step"]))
        return TrainResult(
            weights_dir=result["weights_dir"],
            global_step=result["global_step"],
            train_loss=result["train_loss"],
            resumed_from_step=result["resumed_from_step"],
            nproc=nproc,
            mlflow_run_id=run_id,
        )
