"""Multi-node training on Kubernetes as a Kubeflow Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1).

    tuneflow k8s render --config configs/qwen2.5-7b-qlora-zero2.yaml --image REGISTRY/tuneflow-gpu:TAG \\
        --gpus-per-node 8 --nnodes 2 > trainjob.yaml

The manifest is `trainjob.yaml` beside this module; `render_trainjob` loads it and sets what depends on the run (the
fields marked `# set:` there), a pure function of the config: train.nnodes (or `nnodes`) becomes `numNodes`,
train.nproc_per_node the processes and `nvidia.com/gpu` of each node. Kubeflow's `torch-distributed` runtime starts one
pod per node and gives each the rendezvous in PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT (node 0's
address, discovered by the runtime, never typed by hand). Each pod runs `tuneflow k8s node`
(`tuneflow.placement.kubernetes.node`): it reads the training request from TUNEFLOW_TRAIN_REQUEST, takes its node's
place in the rendezvous from the PET_* variables, and runs the training attempt
(`tuneflow.training.launch.run.train_once`, which launches the training worker under torchrun). The request holds
references only (config, pinned model, prepared-data artifact, MLflow run); the Hub token and the MLflow credentials
come from a Kubernetes Secret by reference, never as values.

This module imports pydantic, PyYAML and the config only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.errors import TuneflowError

RUNTIME = "torch-distributed"  # Kubeflow Trainer's built-in ClusterTrainingRuntime for torchrun
NODE_CONTAINER = "node"  # the trainer container's name in that runtime
REQUEST_ENV = "TUNEFLOW_TRAIN_REQUEST"
NODE_DIR_ENV, DEFAULT_NODE_DIR = "TUNEFLOW_NODE_DIR", "/cache/train"  # the node's training folder (the cache volume)
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes shows what a container writes here as its termination message
TEMPLATE = Path(__file__).with_name("trainjob.yaml")  # the manifest; this module sets what depends on the run


class ManifestError(TuneflowError, ValueError):
    """A TrainJob that cannot be rendered as asked (a shape it cannot schedule, a name that is no DNS label)."""


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
            raise ManifestError("train.nproc_per_node is 'auto': pass gpus_per_node (--gpus-per-node), the GPUs of "
                             "each node, since a cluster has no local GPU count to take it from")
        nproc = gpus_per_node
    else:
        nproc = int(t.nproc_per_node)
        if gpus_per_node is not None and gpus_per_node != nproc:
            raise ManifestError(f"gpus_per_node={gpus_per_node} differs from train.nproc_per_node={nproc}: "
                             "one training process per GPU; make them equal")
    if nproc < 1:
        raise ManifestError(f"gpus_per_node must be at least 1, got {nproc}")
    nodes = t.nnodes if nnodes is None else nnodes
    if nodes < 1:
        raise ManifestError(f"nnodes must be at least 1, got {nodes}")
    name = name or trainjob_name(config.run_name)
    if not _NAME_RE.match(name) or len(name) > 63 or not name[0].isalpha():
        raise ManifestError(f"TrainJob name {name!r} is not a DNS label (lowercase letters, digits and '-', "
                         "starting with a letter, at most 63 characters)")

    job = yaml.safe_load(TEMPLATE.read_text())
    job["metadata"].update(name=name, namespace=namespace)
    job["metadata"]["labels"]["tuneflow/run-name"] = trainjob_name(config.run_name)
    job["spec"]["runtimeRef"]["name"] = runtime
    trainer = job["spec"]["trainer"]
    trainer.update(image=image, numNodes=nodes, numProcPerNode=nproc)
    trainer["resourcesPerNode"] = {"limits": {"nvidia.com/gpu": nproc}, "requests": {"nvidia.com/gpu": nproc}}
    variables = trainer["env"]
    for var in variables:
        if var["name"] == "MLFLOW_TRACKING_URI":
            var["value"] = tracking_uri or _http_uri(config.tracking.uri) or var["value"]
        if "valueFrom" in var:
            var["valueFrom"]["secretKeyRef"]["name"] = secret_name
    taken = {v["name"] for v in variables} | {REQUEST_ENV}
    variables += [{"name": k, "value": str(v)} for k, v in (env or {}).items()
                  if k not in taken and not k.startswith("PET_")]
    if request_json is not None:
        variables.append({"name": REQUEST_ENV, "value": request_json})
    (node,) = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    if node_selector is not None:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations is not None:
        pod["tolerations"] = [dict(x) for x in tolerations]
    if service_account:
        pod["serviceAccountName"] = service_account
    return job
