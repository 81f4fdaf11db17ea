"""The training stage as a flow of its own, for GPU workers: the `tuneflow-train/gpu` deployment.

    make deploy                                  # registers it on the `gpu` work pool (deployments/prefect.yaml)
    prefect worker start --pool gpu              # on each GPU machine

The pipeline (`tuneflow-finetune`) starts one flow run of it per training attempt and waits for it; with
train.nnodes > 1, one flow run per node, each with its node rank and the attempt's rendezvous id: node 0 publishes
its address through the Prefect API and the others join it (`tuneflow.training.launch.rendezvous`). The run needs
nothing from the pipeline's machine: the model comes from the Hub (by commit), the prepared data and any checkpoint to
resume from come from the stage's MLflow run, and node 0 puts the trained weights back there.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow, get_run_logger

from tuneflow.core.results import TrainRequest


@flow(name="tuneflow-train")
def train_on_worker(request: TrainRequest) -> dict:
    """One training attempt (or one node's part of it) on this worker; node 0 returns the TrainResult (also logged
    to the stage's MLflow run), the other nodes their node rank.

    Args:
        request: Written by the pipeline's train stage: the config, the pinned model, the prepared data artifact,
            the MLflow run to train into and, on several nodes, this node's rank and the rendezvous id.
    """
    from tuneflow.training.launch import rendezvous
    from tuneflow.training.launch.run import train_once

    logger = get_run_logger()
    folder = Path(request.config.output_dir) / request.run_folder / "train"
    t = request.config.train
    join = None
    if t.nnodes > 1:
        if not request.rendezvous_id:
            raise ValueError("train.nnodes > 1 but the request has no rendezvous id: the pipeline's train stage "
                             "starts the nodes of a multi-node attempt")
        # Each attempt in a folder of its own: every node then resumes from the same checkpoint, the one in MLflow.
        folder = folder / request.rendezvous_id
        join = partial(rendezvous.join, t.nnodes, request.node_rank, request.rendezvous_id,
                       master_port=t.master_port, join_timeout=t.join_timeout, logger=logger)

    result = train_once(request, folder.resolve(), logger, join)
    return result.model_dump(mode="json") if result else {"node_rank": request.node_rank}
