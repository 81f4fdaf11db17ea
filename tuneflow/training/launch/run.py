"""One training attempt on this machine: the part of the train stage that needs the GPUs.

    train_once(request, folder, logger)

It finds the base model (Hub cache, by commit) and the prepared data (MLflow artifact) on this machine, restores
the newest checkpoint uploaded to the stage's MLflow run if this machine has none as new (an attempt that died on
another machine), launches the worker under torchrun, and logs the trained weights as an artifact. The pipeline
runs it in-process (`tuneflow run`) or on a GPU worker as the `tuneflow-train` flow. It needs Prefect only to
read the Hub token from a Secret block (hub.token_secret).

On several nodes, ``join(nproc)`` gives this node its place (`tuneflow.training.launch.rendezvous`) once its model and
data are ready; only node 0 (global rank 0) logs to MLflow, writes result.json and publishes the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from tuneflow.core.loading import ConfigError
from tuneflow.core.results import TrainRequest, TrainResult
from tuneflow.memory.auto import resolve_auto_batches
from tuneflow.memory.estimate import resolve_nproc
from tuneflow.modeling.precision import machine_problem
from tuneflow.modeling.precision import resolved as resolve_precision
from tuneflow.sources.adapters import adapter_folder
from tuneflow.sources.hub import fetch
from tuneflow.tracking.artifacts import materialize, publish
from tuneflow.tracking.runs import log_params
from tuneflow.training.checkpoints import restore_checkpoint
from tuneflow.training.launch.launcher import launch
from tuneflow.training.launch.rendezvous import Rendezvous
from tuneflow.training.spec import TrainOutcome, TrainSpec

RESULT_ARTIFACT = "train_result.json"


def train_once(request: TrainRequest, folder: Path, logger,
               join: Callable[[int], Rendezvous] | None = None) -> TrainResult | None:
    """Train (or resume) in ``folder``; raise WorkerFailed naming the failed ranks. Returns the result on node 0,
    None on the other nodes of a multi-node attempt (``join``: this node's place, given its process count)."""
    from mlflow import MlflowClient

    cfg, run_id = request.config, request.mlflow_run_id
    problem = machine_problem(cfg)  # on the machine that trains, before anything is fetched
    if problem:
        raise ConfigError(problem)
    client = MlflowClient(request.tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = fetch(request.model, cfg, logger, tracking_uri=request.tracking_uri)
    data_dir = materialize(request.data, request.tracking_uri)
    restored = restore_checkpoint(client, run_id, request.tracking_uri, folder / "checkpoints")
    if restored is not None:
        logger.info("restored checkpoint-%d from MLflow run %s", restored, run_id)
    nproc = resolve_nproc(cfg.train.nproc_per_node)
    place = join(nproc) if join else Rendezvous(master_port=cfg.train.master_port)
    world_size = place.nnodes * nproc
    # 'auto' precision is chosen here, on the machine that trains (each node on its own; the ranks check they agree).
    precision = resolve_precision(cfg)
    logger.info("node %d: %s", place.node_rank, precision.reason)
    if precision.warning:
        logger.warning(precision.warning)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision.precision})})
    # 'auto' batch sizes are chosen here, once, so that every rank reads the same value from the spec.
    cfg, chosen = resolve_auto_batches(cfg, json.loads((Path(model_dir) / "config.json").read_text()),
                                       world_size=world_size)
    for line in chosen:
        logger.info(line)
    if place.node_rank == 0 and "nproc" not in client.get_run(run_id).data.params:  # a retry logs nothing twice
        resolved = {f"resolved.train.{k}": getattr(cfg.train, k) for k in ("per_device_batch_size", "tokens_per_batch")
                    if getattr(request.config.train, k) == "auto"}
        log_params(client, run_id, {"nproc": nproc, "nnodes": place.nnodes, "world_size": world_size,
                                    "deepspeed": cfg.train.deepspeed, "method": cfg.train.method,
                                    "train.precision_resolved": precision.precision, **resolved})
    init = cfg.train.preference.init_adapter if cfg.train.objective != "sft" else None
    init_dir = adapter_folder(init, folder / "init-adapter", request.tracking_uri) if init else None
    spec = folder / "spec.json"
    spec.write_text(TrainSpec(config=cfg, model_dir=str(model_dir), data_dir=str(data_dir), output_dir=str(folder),
                              init_adapter_dir=str(init_dir) if init_dir else None).model_dump_json(indent=1))
    env = {"MLFLOW_TRACKING_URI": request.tracking_uri, "MLFLOW_RUN_ID": run_id, "TOKENIZERS_PARALLELISM": "false"}
    launch(spec, nproc, place.master_port, env, on_line=logger.info, nnodes=place.nnodes, node_rank=place.node_rank,
           master_addr=place.master_addr, rdzv_id=place.rdzv_id,
           join_timeout=place.join_timeout if place.multi_node else None)
    if place.node_rank > 0:  # only node 0 (global rank 0) writes result.json and the weights
        logger.info("node %d: training finished", place.node_rank)
        return None

    outcome = TrainOutcome.model_validate_json((folder / "result.json").read_text())
    weights = Path(outcome.weights_dir)
    ref = publish(client, run_id, weights, weights.name)  # "adapter" (qlora, lora) or "model" (full, freeze)
    if (folder / "loss_curve.png").is_file():
        client.log_artifact(run_id, str(folder / "loss_curve.png"))
    if outcome.resumed_from_step is not None:
        client.set_tag(run_id, "resumed_from_step", str(outcome.resumed_from_step))
    result = TrainResult(weights=ref, global_step=outcome.global_step, train_loss=outcome.train_loss,
                         resumed_from_step=outcome.resumed_from_step, nproc=nproc, nnodes=place.nnodes,
                         world_size=world_size, precision=precision.precision, mlflow_run_id=run_id,
                         stopped=outcome.stopped)
    client.log_dict(run_id, result.model_dump(mode="json"), RESULT_ARTIFACT)
    return result
