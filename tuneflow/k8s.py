"""Multi-node training on Kubernetes as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1).

    python -m tuneflow.k8s render --config configs/qwen2.5-7b-qlora-zero2.yaml --image REGISTRY/tuneflow-gpu:TAG \\
        --gpus-per-node 8 --nnodes 2 > trainjob.yaml          # infra/k8s/trainjob.example.yaml is this output

`render_trainjob` is a pure function of the config: train.nnodes (or `nnodes`) becomes `numNodes`,
train.nproc_per_node the processes and `nvidia.com/gpu` of each node. Kubeflow's `torch-distributed` runtime starts one pod per node and
gives each the rendezvous in PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT (node 0's address,
discovered by the runtime, never typed by hand). Each pod runs `python -m tuneflow.k8s node`: it reads the
training request from TUNEFLOW_TRAIN_REQUEST, takes its node's place in the rendezvous from the PET_* variables,
and runs the training attempt (`tuneflow.training.launch.run.train_once`, which launches the training worker under
torchrun). The request holds references only (config, pinned model, prepared-data artifact, MLflow run); the Hub
token and the MLflow credentials come from a Kubernetes Secret by reference, never as values.

This module imports pydantic and the config only, like `tuneflow.core.config`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from tuneflow.core.config import TuneflowConfig

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "torch-distributed"  # Kubeflow Trainer's built-in ClusterTrainingRuntime for torchrun
NODE_CONTAINER = "node"  # the trainer container's name in that runtime
REQUEST_ENV = "TUNEFLOW_TRAIN_REQUEST"
NODE_DIR_ENV, DEFAULT_NODE_DIR = "TUNEFLOW_NODE_DIR", "/cache/train"  # the node's training folder (the cache volume)
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes shows what a container writes here as its termination message
SECRET_KEYS = {  # env var -> (key in the credentials Secret, optional)
    "MLFLOW_TRACKING_USERNAME": ("MLFLOW_TRACKING_USERNAME", False),
    "MLFLOW_TRACKING_PASSWORD": ("MLFLOW_TRACKING_PASSWORD", False),
    "HF_TOKEN": ("HF_TOKEN", True),
}
DEFAULT_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
DEFAULT_TRACKING_URI = "http://mlflow.tuneflow.svc:5000"  # the MLflow Service of docs/infrastructure.md
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def trainjob_name(run_name: str) -> str:
    """A DNS-1035 label from a run name (the TrainJob's name becomes its pods' host names)."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:40].rstrip("-")
    return name or "tuneflow"


def attempt_name(run_folder: str, mlflow_run_id: str, attempt: int) -> str:
    """The TrainJob of one training attempt: unique per pipeline run (its train run id) and per attempt."""
    return f"{trainjob_name(run_folder)[:26].rstrip('-')}-{mlflow_run_id[:8]}-{attempt}"


def _http_uri(uri: str | None) -> str | None:
    """A tracking URI pods can use: a server's, not a local file or sqlite path."""
    return uri if uri and uri.startswith(("http://", "https://")) else None


def render_trainjob(
    config: TuneflowConfig,
    image: str,
    *,
    name: str | None = None,
    namespace: str = "tuneflow",
    request_json: str | None = None,
    gpus_per_node: int | None = None,
    nnodes: int | None = None,
    tracking_uri: str | None = None,
    secret_name: str = "tuneflow-credentials",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    service_account: str | None = None,
    runtime: str = RUNTIME,
    env: dict[str, str] | None = None,
) -> dict:
    """The TrainJob manifest (a dict ready for YAML or the Kubernetes API) that trains ``config`` on
    train.nnodes nodes of ``gpus_per_node`` GPUs each.

    Args:
        config: the validated config; its train section sets the shape of the job.
        image: the tuneflow GPU image as the cluster pulls it (infra/docker/gpu.Dockerfile).
        name: the TrainJob's name (a DNS label); default: from config.run_name.
        request_json: the `tuneflow.core.results.TrainRequest` as JSON, set as TUNEFLOW_TRAIN_REQUEST in every pod
            (the train stage passes it; without it the manifest shows the shape only and its pods stop at once,
            saying that the request is missing).
        gpus_per_node: GPUs (and training processes) per node; required when train.nproc_per_node is 'auto'
            (a cluster has no local GPU count to take it from), else it must equal train.nproc_per_node.
        tracking_uri: the MLflow server as pods reach it; default: config.tracking.uri, else the in-cluster
            service of docs/infrastructure.md.
        secret_name: the Secret holding MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD and (optional) HF_TOKEN.
        node_selector, tolerations: where training pods may run (default: nodes labelled with a GPU, tolerating
            the nvidia.com/gpu taint).
        env: more environment variables for every node (the work pool's `env` job variable, e.g. HF_ENDPOINT); they
            do not replace the ones set here.
    """
    t = config.train
    if t.nproc_per_node == "auto":
        if gpus_per_node is None:
            raise ValueError("train.nproc_per_node is 'auto': pass gpus_per_node (--gpus-per-node), the GPUs of "
                             "each node, since a cluster has no local GPU count to take it from")
        nproc = gpus_per_node
    else:
        nproc = int(t.nproc_per_node)
        if gpus_per_node is not None and gpus_per_node != nproc:
            raise ValueError(f"gpus_per_node={gpus_per_node} differs from train.nproc_per_node={nproc}: "
                             "one training process per GPU; make them equal")
    if nproc < 1:
        raise ValueError(f"gpus_per_node must be at least 1, got {nproc}")
    nodes = t.nnodes if nnodes is None else nnodes
    if nodes < 1:
        raise ValueError(f"nnodes must be at least 1, got {nodes}")
    name = name or trainjob_name(config.run_name)
    if not _NAME_RE.match(name) or len(name) > 63 or not name[0].isalpha():
        raise ValueError(f"TrainJob name {name!r} is not a DNS label (lowercase letters, digits and '-', "
                         "starting with a letter, at most 63 characters)")

    variables: list[dict[str, Any]] = [
        {"name": "MLFLOW_TRACKING_URI", "value": tracking_uri or _http_uri(config.tracking.uri) or DEFAULT_TRACKING_URI},
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
        {"name": "HF_HUB_CACHE", "value": "/cache/huggingface/hub"},
        {"name": "TUNEFLOW_CACHE", "value": "/cache/tuneflow"},
        {"name": NODE_DIR_ENV, "value": DEFAULT_NODE_DIR},
    ]
    for var, (key, optional) in SECRET_KEYS.items():
        ref: dict[str, Any] = {"name": secret_name, "key": key}
        if optional:
            ref["optional"] = True
        variables.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    taken = {v["name"] for v in variables} | {REQUEST_ENV}
    variables += [{"name": k, "value": str(v)} for k, v in (env or {}).items()
                  if k not in taken and not k.startswith("PET_")]
    if request_json is not None:
        variables.append({"name": REQUEST_ENV, "value": request_json})

    pod_patch = {
        "nodeSelector": dict(node_selector if node_selector is not None else {"nvidia.com/gpu.present": "true"}),
        "tolerations": [dict(x) for x in (tolerations if tolerations is not None else DEFAULT_TOLERATIONS)],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
        "volumes": [
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and torchrun's ranks share memory here
        ],
        "containers": [{
            "name": NODE_CONTAINER,
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"}, {"name": "dshm", "mountPath": "/dev/shm"}],
            "securityContext": {"allowPrivilegeEscalation": False},
        }],
    }
    if service_account:
        pod_patch["serviceAccountName"] = service_account
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "tuneflow", "tuneflow/run-name": trainjob_name(config.run_name)},
        },
        "spec": {
            "runtimeRef": {"name": runtime, "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"},
            "trainer": {
                "image": image,
                "command": ["python", "-m", "tuneflow.k8s", "node"],
                "numNodes": nodes,
                "numProcPerNode": nproc,
                "resourcesPerNode": {
                    "limits": {"nvidia.com/gpu": nproc},
                    "requests": {"nvidia.com/gpu": nproc},
                },
                "env": variables,
            },
            "runtimePatches": [{
                "manager": "tuneflow",
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": NODE_CONTAINER,
                    "template": {"spec": {"template": {"spec": pod_patch}}},
                }]}}},
            }],
        },
    }


def node_rendezvous(environ: dict[str, str]) -> dict[str, Any]:
    """train.* settings of this pod's node, from the PET_* variables Kubeflow's torch runtime sets."""
    missing = [k for k in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT") if not environ.get(k)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: `tuneflow.k8s node` runs inside a TrainJob pod of the "
                           f"{RUNTIME} runtime, which sets them")
    return {
        "nnodes": int(environ["PET_NNODES"]),
        "node_rank": int(environ["PET_NODE_RANK"]),
        "master_addr": environ["PET_MASTER_ADDR"],
        "master_port": int(environ["PET_MASTER_PORT"]),
    }


def _node() -> int:
    """One TrainJob pod: this node's part of the training attempt described by TUNEFLOW_TRAIN_REQUEST. A failure ends
    with one line `tuneflow.k8s node N failed: ...` on stderr and in the termination message."""
    import logging
    from pathlib import Path

    raw = os.environ.get(REQUEST_ENV)
    if not raw:
        print(f"tuneflow.k8s node: {REQUEST_ENV} is not set: the train stage puts the training request there "
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
        request = request.model_copy(update={"node_rank": place.node_rank, "config": config,
                                             "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI") or request.tracking_uri})
        logger.info("node %d of %d, rendezvous at %s:%d", place.node_rank, place.nnodes, place.master_addr,
                    place.master_port)
        folder = Path(os.environ.get(NODE_DIR_ENV) or DEFAULT_NODE_DIR) / request.run_folder
        train_once(request, folder, logger, join=lambda nproc: place)
    except Exception as exc:  # noqa: BLE001 - one line for the train stage's error message, then the traceback
        said = " / ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        line = f"tuneflow.k8s node {rank} failed: {type(exc).__name__}: {said}"
        logger.exception("training failed on this node")
        if os.path.exists(TERMINATION_LOG):
            with open(TERMINATION_LOG, "w") as out:
                out.write(line[:4000])
        print(line, file=sys.stderr, flush=True)
        return 1
    return 0


def _render(args: argparse.Namespace) -> int:
    import yaml

    from tuneflow.core.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
        manifest = render_trainjob(config, args.image, name=args.name, namespace=args.namespace,
                                   gpus_per_node=args.gpus_per_node, nnodes=args.nnodes,
                                   tracking_uri=args.tracking_uri)
    except (ConfigError, ValueError) as exc:
        print(f"tuneflow.k8s render: {exc}", file=sys.stderr)
        return 2
    if args.header:
        print(args.header.rstrip())
    print(yaml.safe_dump(manifest, sort_keys=False, width=120), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneflow.k8s", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the TrainJob for a config as YAML")
    render.add_argument("--config", required=True, help="a tuneflow YAML config")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    render.add_argument("--image", required=True, help="the tuneflow GPU image as the cluster pulls it")
    render.add_argument("--gpus-per-node", type=int, default=None, help="required when train.nproc_per_node is auto")
    render.add_argument("--nnodes", type=int, default=None, help="nodes (default: train.nnodes)")
    render.add_argument("--name", default=None, help="TrainJob name (default: from run_name)")
    render.add_argument("--namespace", default="tuneflow")
    render.add_argument("--tracking-uri", default=None, help="MLflow as the pods reach it")
    render.add_argument("--header", default=None, help=argparse.SUPPRESS)
    sub.add_parser("node", help="run one TrainJob node (inside the pod)")
    args = parser.parse_args(argv)
    return _render(args) if args.command == "render" else _node()


if __name__ == "__main__":
    sys.exit(main())
