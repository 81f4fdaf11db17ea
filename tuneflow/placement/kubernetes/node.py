"""One node of a training TrainJob, inside its pod: `tuneflow k8s node` (the TrainJob's command, see `manifest`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from tuneflow.placement.kubernetes.manifest import DEFAULT_NODE_DIR, NODE_DIR_ENV, REQUEST_ENV, RUNTIME, TERMINATION_LOG


def node_rendezvous(environ: dict[str, str]) -> dict[str, Any]:
    """train.* settings of this pod's node, from the PET_* variables Kubeflow's torch runtime sets."""
    missing = [k for k in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT") if not environ.get(k)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: `tuneflow k8s node` runs inside a TrainJob pod of the "
                           f"{RUNTIME} runtime, which sets them")
    return {
        "nnodes": int(environ["PET_NNODES"]),
        "node_rank": int(environ["PET_NODE_RANK"]),
        "master_addr": environ["PET_MASTER_ADDR"],
        "master_port": int(environ["PET_MASTER_PORT"]),
    }


def run_node() -> int:
    """One TrainJob pod: this node's part of the training attempt described by TUNEFLOW_TRAIN_REQUEST. A failure ends
    with one line `tuneflow k8s node N failed: ...` on stderr and in the termination message."""
    raw = os.environ.get(REQUEST_ENV)
    if not raw:
        print(f"tuneflow k8s node: {REQUEST_ENV} is not set: the train stage puts the training request there "
              "(a TrainJob rendered without request_json shows the job's shape only)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logger = logging.getLogger("tuneflow.k8s")
    rank = os.environ.get("PET_NODE_RANK", "?")
    try:
        from tuneflow.core.results import TrainRequest
        from tuneflow.training.launch.rendezvous import Rendezvous
        from tuneflow.training.launch.run import train_once

        request = TrainRequest.model_validate_json(raw)
        place = Rendezvous(**node_rendezvous(dict(os.environ)), rdzv_id=request.rendezvous_id,
                           join_timeout=request.config.train.join_timeout)
        # MLflow as this pod reaches it (the pool's mlflow_tracking_uri), and the Hub token from the credentials
        # Secret (HF_TOKEN): a pod has no Prefect API to read a Secret block from.
        config = request.config.model_copy(update={"hub": request.config.hub.model_copy(update={"token_secret": None})})
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or request.tracking_uri
        request = request.model_copy(update={"node_rank": place.node_rank, "config": config, "tracking_uri": tracking})
        logger.info("node %d of %d, rendezvous at %s:%d", place.node_rank, place.nnodes, place.master_addr,
                    place.master_port)
        folder = Path(os.environ.get(NODE_DIR_ENV) or DEFAULT_NODE_DIR) / request.run_folder
        train_once(request, folder, logger, join=lambda nproc: place)
    except Exception as exc:  # noqa: BLE001 - one line for the train stage's error message, then the traceback
        said = " / ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        line = f"tuneflow k8s node {rank} failed: {type(exc).__name__}: {said}"
        logger.exception("training failed on this node")
        if os.path.exists(TERMINATION_LOG):
            with open(TERMINATION_LOG, "w") as out:
                out.write(line[:4000])
        print(line, file=sys.stderr, flush=True)
        return 1
    return 0
