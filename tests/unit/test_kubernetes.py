"""Offline validation of the Kubernetes side: the worker's manifests, the TrainJob, the GPU work pool's template.

A cluster is not available where the suite runs, so these are checked against the specs their tools use: the
Kubernetes API schemas in strict mode (kubernetes-validate), the TrainJob CRD's own OpenAPI schema (vendored in
infra/k8s/crds/), and the GPU work pool's base job template rendered by prefect-kubernetes' own job-configuration code.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import uuid
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.trainjob_schema import assert_valid_trainjob, strict_trainjob_validator
from tuneflow.cli.main import main as tuneflow_main
from tuneflow.core.loading import load_config
from tuneflow.placement.kubernetes.manifest import TEMPLATE, render_trainjob
from tuneflow.placement.kubernetes.node import node_rendezvous

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
K8S_VERSION = "1.37.0"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", re.IGNORECASE)


# --- Kubernetes -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainjob_validator():
    return strict_trainjob_validator()


def test_worker_manifests_pass_strict_kubernetes_validation():
    docs = [d for d in yaml.safe_load_all((K8S / "prefect-worker.yaml").read_text()) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Role", "Role", "RoleBinding", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:6] == ["prefect", "worker", "start", "--type", "kubernetes", "--pool"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"] == {
        "name": "tuneflow-credentials", "key": "PREFECT_API_AUTH_STRING"}
    assert all("value" not in e for n, e in env.items() if SECRET_NAME.search(n))
    assert pod["securityContext"]["runAsNonRoot"] is True
    service_accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    bound = {(b["roleRef"]["name"], s["name"]) for b in docs if b["kind"] == "RoleBinding" for s in b["subjects"]}
    assert pod["serviceAccountName"] in service_accounts and ("prefect-worker", "prefect-worker") in bound
    assert ("tuneflow-trainjobs", "tuneflow-flow-run") in bound
    # Strict mode catches a misspelt field.
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_trainjob_rendered_from_each_preset_matches_the_crd(preset, trainjob_validator):
    config = load_config(str(preset))
    gpus = 4 if config.train.nproc_per_node == "auto" else None
    job = render_trainjob(config, "registry.example.com/tuneflow-gpu:1", nnodes=3, gpus_per_node=gpus,
                          request_json='{"placeholder": true}')
    assert_valid_trainjob(trainjob_validator, job)
    trainer = job["spec"]["trainer"]
    nproc = gpus or config.train.nproc_per_node
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == nproc
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": nproc}
    assert trainer["command"] == ["tuneflow", "k8s", "node"]
    env = {e["name"]: e for e in trainer["env"]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    assert env["TUNEFLOW_TRAIN_REQUEST"]["value"] == '{"placeholder": true}'
    # The PET_* rendezvous variables belong to the runtime: Kubeflow refuses a TrainJob that sets them.
    assert not any(name.startswith("PET_") for name in env)
    # numNodes comes from train.nnodes when not given.
    one = render_trainjob(config.model_copy(update={"train": config.train.model_copy(update={"nnodes": 1})}),
                          "img", gpus_per_node=gpus)
    assert one["spec"]["trainer"]["numNodes"] == 1
    assert_valid_trainjob(trainjob_validator, one)


def test_trainjob_scheduling_goes_into_the_runtime_patch(trainjob_validator):
    config = load_config(str(ROOT / "configs" / "demo.yaml"))
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoSchedule"}]
    job = render_trainjob(config, "img", node_selector={"gpu": "h100"}, tolerations=tolerations,
                          service_account="tuneflow-flow-run")
    assert_valid_trainjob(trainjob_validator, job)
    (patch,) = job["spec"]["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"  # the torch-distributed runtime's replicated job
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"] == tolerations
    assert pod["serviceAccountName"] == "tuneflow-flow-run" and pod["securityContext"]["runAsNonRoot"] is True
    # A field the CRD does not have is refused, as the API server would prune or reject it.
    broken = copy.deepcopy(job)
    broken["spec"]["trainer"]["numNode"] = broken["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e.message for e in trainjob_validator.iter_errors(broken))


def test_trainjob_refuses_a_shape_it_cannot_schedule():
    config = load_config(str(ROOT / "configs" / "qwen2.5-7b-qlora-zero2.yaml"))  # nproc_per_node: auto
    with pytest.raises(ValueError, match="gpus_per_node"):
        render_trainjob(config, "img")
    demo = load_config(str(ROOT / "configs" / "demo.yaml"))  # nproc_per_node: 2
    with pytest.raises(ValueError, match="differs from train.nproc_per_node=2"):
        render_trainjob(demo, "img", gpus_per_node=4)
    with pytest.raises(ValueError, match="DNS label"):
        render_trainjob(demo, "img", name="Not_A_Label")


def test_the_template_is_a_trainjob_and_its_command_renders_what_it_says(trainjob_validator, capsys):
    """The manifest users read (trainjob.yaml) is valid as written; the command in its header prints it with the
    run's values set (`# set:`), everything else as written."""
    text = TEMPLATE.read_text()
    template = yaml.safe_load(text)
    assert_valid_trainjob(trainjob_validator, template)
    header = "\n".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    args = shlex.split(re.search(r"tuneflow k8s (render .*?--nnodes \d+)", header.replace("\\\n", " "))[1])
    assert tuneflow_main(["k8s", *args]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert_valid_trainjob(trainjob_validator, job)
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 8, "REGISTRY/tuneflow-gpu:TAG")
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8}
    assert job["spec"]["runtimePatches"] == template["spec"]["runtimePatches"]
    assert trainer["env"] == template["spec"]["trainer"]["env"]
    assert trainer["command"] == template["spec"]["trainer"]["command"] == ["tuneflow", "k8s", "node"]


def test_node_rendezvous_comes_from_the_runtime_environment():
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}
    assert node_rendezvous(env) == {"nnodes": 2, "node_rank": 1, "master_addr": "job-node-0-0.job",
                                    "master_port": 29400}
    with pytest.raises(RuntimeError, match="PET_MASTER_ADDR"):
        node_rendezvous({k: v for k, v in env.items() if k != "PET_MASTER_ADDR"})


# --- The Prefect Kubernetes work pool ------------------------------------------------------------------------

def render_work_pool_job(values: dict) -> dict:
    """The Job manifest prefect-kubernetes' worker would create for a flow run with these job variables."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((K8S / "gpu-work-pool.json").read_text())
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    flow_run = FlowRun(id=uuid.uuid4(), name="tuneflow-train-sample", flow_id=uuid.uuid4())
    config.prepare_for_flow_run(flow_run)
    return config.job_manifest


def validate_job_strictly(job: dict) -> None:
    """Strict validation of a rendered Job. prefect-kubernetes requires `parallelism` and `completions` in the pod
    spec (its `_get_base_job_manifest`), where Kubernetes has no such fields and the API server drops them: they are
    the only fields allowed there beyond the API's."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_gpu_work_pool_template_renders_gpus_node_selector_and_tolerations(prefect_api):
    # prefect_api: the worker's template code resolves block and variable references through the Prefect API.
    template = json.loads((K8S / "gpu-work-pool.json").read_text())
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]
    job = render_work_pool_job({"image": "registry.example.com/tuneflow-gpu:1", "gpu_count": 4,
                                "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                                "tolerations": tolerations, "env": {"HF_ENDPOINT": "http://hub.internal"}})
    validate_job_strictly(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == tolerations
    assert container["image"] == "registry.example.com/tuneflow-gpu:1"
    assert job["metadata"]["namespace"] == "tuneflow" and pod["serviceAccountName"] == "tuneflow-flow-run"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_ENDPOINT"]["value"] == "http://hub.internal"
    assert env["PREFECT__FLOW_RUN_ID"]["value"]  # Prefect's own variables join the template's
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "tuneflow-credentials", "key": name,
                                                          **({"optional": True} if name == "HF_TOKEN" else {})}
    # The defaults: one GPU on a node labelled with a GPU, tolerating the usual GPU taint.
    default = render_work_pool_job({})
    validate_job_strictly(default)
    broken = copy.deepcopy(default)
    broken["spec"]["template"]["spec"]["tolerations"][0]["efect"] = "NoSchedule"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_job_strictly(broken)
    pod = default["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_gpu_work_pool_template_keeps_prefect_kubernetes_defaults():
    """The template started from prefect-kubernetes' default; every default variable is still there."""
    from prefect_kubernetes.worker import KubernetesWorker

    ours = json.loads((K8S / "gpu-work-pool.json").read_text())
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(default["job_configuration"]) == set(ours["job_configuration"])
