"""Multi-node training on a Kubernetes `gpu` pool: the train stage submits a Kubeflow Trainer TrainJob and follows it.

What runs for real: a Prefect server with a work pool of type `kubernetes` (infra/k8s/gpu-work-pool.json) and the
training deployment on it; the pipeline flow (download, prepare, train, evaluate) in its own process, reading the
pool's job variables and submitting with the official `kubernetes` client through a kubeconfig; and each TrainJob
node as `tuneflow k8s node` with Kubeflow's PET_* variables: 2 nodes x 1 process on loopback (gloo),
fetching the model from the Hub (olah) and the data from MLflow, training into the stage's MLflow run.

What is a STAND-IN, because no Kubernetes cluster can run here: the API server and Kubeflow Trainer's controller
(tests/support/k8s_standin.py: TrainJob create/get/delete, pod list and logs, played on loopback; it checks each
TrainJob against the vendored CRD and starts the nodes as local processes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.k8s_standin import stand_in
from tests.support.servers import training_rank_pid

REPO = Path(__file__).resolve().parents[2]
POOL, DEPLOYMENT = "k8s-gpu", "tuneflow-train/k8s-gpu"  # not `gpu`: the team tests' process pool has that name
IMAGE = "registry.example.com/tuneflow-gpu:test"
SECRETS = {"tuneflow-credentials": {"MLFLOW_TRACKING_USERNAME": "pipeline",
                                    "MLFLOW_TRACKING_PASSWORD": "stand-in-password-7c1e"}}
STEPS = 12

PIPELINE = """
import json, sys
from flows.finetune import finetune
from tuneflow.core.config import TuneflowConfig

state = finetune(TuneflowConfig.model_validate(json.loads(sys.argv[1])), train_deployment=sys.argv[2],
                 run_dir=sys.argv[3], return_state=True)
print("PIPELINE", state.type.value, json.dumps(state.message))
"""


def kubernetes_pool(name: str, deployment_name: str, job_variables: dict) -> None:
    """A work pool of type kubernetes with tuneflow's template, and the training flow deployed on it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    template = json.loads((REPO / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="kubernetes", base_job_template=template),
                                overwrite=True)
        flow_id = client.create_flow_from_name("tuneflow-train")
        client.create_deployment(flow_id, deployment_name, work_pool_name=name,
                                 entrypoint="flows.train.train_on_worker", job_variables=job_variables)


@pytest.fixture(scope="module")
def k8s(tmp_path_factory):
    with stand_in(tmp_path_factory.mktemp("k8s-stand-in"), SECRETS) as k8s:
        yield k8s


def config(hub, mlflow: str, output: Path) -> dict:
    return {
        "run_name": "k8s-two-nodes",
        "output_dir": str(output),
        "model": {"name_or_path": hub.model_id},
        "dataset": {"name_or_path": hub.dataset_id, "eval_size": 8},
        "prep": {"cutoff_len": 128},
        "train": {"method": "qlora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}, "learning_rate": 5e-3,
                  "max_steps": STEPS, "save_steps": STEPS, "per_device_batch_size": 4, "gradient_accumulation_steps": 1,
                  "deepspeed": "none", "nproc_per_node": 1, "nnodes": 2, "join_timeout": 120, "retries": 1},
        "eval": {"max_samples": 8, "max_new_tokens": 8, "batch_size": 8},
        "export": {"enabled": False},
        "tracking": {"uri": mlflow, "experiment": "k8s"},
    }


@pytest.fixture(scope="module")
def pipeline(k8s, prefect_api, mlflow_server, hub_mirror, tmp_path_factory):
    """One pipeline run with train.nnodes=2 and train.retries=1 whose training deployment is on the kubernetes pool:
    node 1's training process is killed once both nodes train, so attempt 1 fails and attempt 2 completes."""
    from mlflow import MlflowClient

    kubernetes_pool(POOL, "k8s-gpu", {"image": IMAGE, "mlflow_tracking_uri": mlflow_server, "env": {
        "HF_ENDPOINT": hub_mirror.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}})
    machine = tmp_path_factory.mktemp("k8s-pipeline")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_", "TUNEFLOW_", "KUBE"))}
    env.update(PREFECT_API_URL=prefect_api, HF_ENDPOINT=hub_mirror.endpoint, HF_HUB_CACHE=str(machine / "hf-cache"),
               TUNEFLOW_CACHE=str(machine / "tuneflow-cache"), HOME=str(machine), PYTHONUNBUFFERED="1",
               KUBECONFIG=str(k8s.kubeconfig(machine / "kubeconfig")))
    cfg = config(hub_mirror, mlflow_server, machine / "runs")
    run_dir = machine / "runs" / "k8s-two-nodes"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", PIPELINE, json.dumps(cfg), DEPLOYMENT, str(run_dir)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    context = lambda: "".join(output)[-6000:] + "\n" + k8s.logs()  # noqa: E731
    killed, deadline, mlflow = None, time.monotonic() + 600, MlflowClient(mlflow_server)
    try:
        while killed is None:  # both nodes of attempt 1 train (steps reach MLflow): kill node 1's training process
            assert proc.poll() is None and time.monotonic() < deadline, context()
            if k8s.submitted:
                request = json.loads(next(e["value"] for e in k8s.submitted[0]["spec"]["trainer"]["env"]
                                          if e["name"] == "TUNEFLOW_TRAIN_REQUEST"))
                if mlflow.get_metric_history(request["mlflow_run_id"], "loss"):
                    killed = training_rank_pid(1, in_environ=f"MLFLOW_RUN_ID={request['mlflow_run_id']}")
                    if killed:
                        os.kill(killed, signal.SIGKILL)
            time.sleep(0.3)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    (machine / "pipeline.log").write_text("".join(output))
    print(f"pipeline run with the kill and the relaunch: {time.monotonic() - started:.0f}s ({machine}/pipeline.log)")
    last = [line for line in output if line.startswith("PIPELINE ")]
    assert last, context()
    _, state, message = last[-1].split(" ", 2)
    return {"state": state, "message": json.loads(message), "run_dir": run_dir, "output": "".join(output),
            "request": request, "k8s": k8s, "mlflow": mlflow, "context": context, "hub": hub_mirror,
            "tracking_uri": mlflow_server}


@pytest.mark.slow
def test_each_attempt_submits_one_trainjob_that_matches_the_crd(pipeline):
    from tests.support.trainjob_schema import assert_valid_trainjob

    k8s = pipeline["k8s"]
    assert pipeline["state"] == "COMPLETED", f"{pipeline['message']}\n{pipeline['context']()}"
    first, second = k8s.submitted  # attempt 1 (a node killed) and its relaunch; nothing else
    assert first["metadata"]["name"] != second["metadata"]["name"]  # a new TrainJob per attempt
    for job in (first, second):
        assert_valid_trainjob(k8s.validator, job)
        trainer = job["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (2, 1, IMAGE)
        assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 1}  # the pool's gpu_count
        env = {e["name"]: e for e in trainer["env"]}
        # The deployment's job variables reach every node: the Hub mirror and MLflow as the pods reach them.
        assert env["HF_ENDPOINT"]["value"] == pipeline["hub"].endpoint
        assert env["MLFLOW_TRACKING_URI"]["value"] == pipeline["tracking_uri"]
        request = json.loads(env["TUNEFLOW_TRAIN_REQUEST"]["value"])
        assert request["rendezvous_id"] == job["metadata"]["name"]
        assert request["mlflow_run_id"] == pipeline["request"]["mlflow_run_id"]  # both attempts train one MLflow run
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "tuneflow-credentials"
        assert SECRETS["tuneflow-credentials"]["MLFLOW_TRACKING_PASSWORD"] not in json.dumps(job)
    assert SECRETS["tuneflow-credentials"]["MLFLOW_TRACKING_PASSWORD"] not in pipeline["output"]
    assert f"TrainJob tuneflow/{first['metadata']['name']} submitted" in pipeline["output"]


@pytest.mark.slow
def test_a_killed_node_fails_its_attempt_naming_it_and_the_trainjob_is_deleted(pipeline):
    k8s, mlflow = pipeline["k8s"], pipeline["mlflow"]
    first, second = (j["metadata"]["name"] for j in k8s.submitted)
    error = mlflow.get_run(pipeline["request"]["mlflow_run_id"]).data.tags["attempt_1_error"]
    pod1 = k8s.history[first].pods[1].name
    said = f"node 1 (pod {pod1} on stand-in): exit code 1 (Error): tuneflow k8s node 1 failed: WorkerFailed"
    assert said in error, error
    assert "rank 1: exit code -9 (SIGKILL)" in error, error
    assert k8s.deleted == [first]  # the failed attempt's TrainJob is deleted, the completed one is kept
    assert all(p.proc.poll() is not None for p in k8s.history[first].pods)  # every node of it has stopped


@pytest.mark.slow
def test_the_relaunch_trains_on_two_nodes_into_one_mlflow_run(pipeline):
    k8s, mlflow = pipeline["k8s"], pipeline["mlflow"]
    second = k8s.submitted[1]["metadata"]["name"]
    summary = json.loads((pipeline["run_dir"] / "summary.json").read_text())
    train = summary["stages"]["train"]
    assert (train["nnodes"], train["world_size"], train["nproc"]) == (2, 2, 1), train
    assert (train["attempts"], train["global_step"]) == (2, STEPS), train
    assert summary["stages"]["evaluate"]["status"] == "completed"
    run_id = pipeline["request"]["mlflow_run_id"]
    params = mlflow.get_run(run_id).data.params
    assert (params["nnodes"], params["world_size"]) == ("2", "2")
    top = [a.path for a in mlflow.list_artifacts(run_id)]
    assert "adapter" in top and "model" not in top and top.count("train_result.json") == 1, top
    assert all(p.exit_code == 0 for p in k8s.history[second].pods)
    node1 = k8s.node_log(second, 1)  # node 1 trained as global rank 1 and published nothing itself
    assert "node 1 of 2, rendezvous at 127.0.0.1:" in node1 and "node 1: training finished" in node1, node1


def test_cluster_problems_are_one_line_errors_that_say_what_to_do(k8s, tmp_path, monkeypatch):
    from tuneflow.core.loading import load_config
    from tuneflow.placement.kubernetes.trainjob import KubernetesError, TrainJobApi, manifest_for, run_trainjob

    cfg = load_config(str(REPO / "configs" / "demo.yaml"), ["train.nnodes=2", "train.nproc_per_node=1"])
    manifest = manifest_for(cfg, {"image": IMAGE, "namespace": "tuneflow"}, "setup-check", "{}", {})
    logger = logging.getLogger("test")

    def error(kubeconfig) -> str:
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        with pytest.raises(KubernetesError) as info:
            run_trainjob(manifest, TrainJobApi.connect(), 60, 60, logger)
        assert "\n" not in str(info.value)
        return str(info.value)

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert "no Kubernetes credentials" in error(tmp_path / "missing")
    assert "401 Unauthorized" in error(k8s.kubeconfig(tmp_path / "wrong", token="wrong-token"))
    good = k8s.kubeconfig(tmp_path / "good")
    monkeypatch.setattr(k8s, "crd_installed", False)
    said = error(good)
    assert "no TrainJob API" in said and "docs/infrastructure.md" in said, said
    monkeypatch.setattr(k8s, "crd_installed", True)
    monkeypatch.setattr(k8s, "allowed", False)
    said = error(good)
    assert "403 Forbidden" in said and "create and delete on trainjobs.trainer.kubeflow.org" in said, said
    monkeypatch.setattr(k8s, "allowed", True)
    assert "setup-check" not in k8s.history  # nothing was created


def test_the_pool_settings_are_its_defaults_overridden_by_the_deployment(prefect_api):
    from tuneflow.placement.kubernetes.trainjob import pool_settings

    kubernetes_pool("k8s-settings", "k8s-settings", {"image": IMAGE, "gpu_count": 8, "env": {"HF_ENDPOINT": "http://hub"}})
    settings = pool_settings("tuneflow-train/k8s-settings")
    assert (settings["image"], settings["gpu_count"], settings["env"]) == (IMAGE, 8, {"HF_ENDPOINT": "http://hub"})
    assert settings["namespace"] == "tuneflow" and settings["secret_name"] == "tuneflow-credentials"
    assert settings["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert settings["mlflow_tracking_uri"] == "http://mlflow.tuneflow.svc:5000"
    # A process pool keeps one flow run per node.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="k8s-settings-process", type="process"), overwrite=True)
        flow_id = client.create_flow_from_name("tuneflow-train")
        client.create_deployment(flow_id, "k8s-settings-process", work_pool_name="k8s-settings-process",
                                 entrypoint="flows.train.train_on_worker")
    assert pool_settings("tuneflow-train/k8s-settings-process") is None


def test_node_states_come_from_the_pods_as_jobset_labels_them():
    """What a real cluster can show that the stand-in does not: a container restarted in place after an error (its
    failure is in lastState), a pod that cannot be scheduled, the rank only as a label."""
    from tuneflow.placement.kubernetes.trainjob import read_nodes

    restarted = {"metadata": {"name": "job-node-0-0-abc", "creationTimestamp": "2026-01-01T00:00:01Z",
                              "annotations": {"batch.kubernetes.io/job-completion-index": "0"}},
                 "spec": {"nodeName": "gpu-a"},
                 "status": {"phase": "Running", "containerStatuses": [{
                     "name": "node", "restartCount": 1, "state": {"running": {}},
                     "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": ""}}}]}}
    unschedulable = {"metadata": {"name": "job-node-0-1-def", "creationTimestamp": "2026-01-01T00:00:01Z",
                                  "labels": {"batch.kubernetes.io/job-completion-index": "1"}},
                     "spec": {}, "status": {"phase": "Pending", "conditions": [{
                         "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    node0, node1 = read_nodes([unschedulable, restarted], 2, "node")
    assert node0.failure["exitCode"] == 137 and node0.failure["reason"] == "OOMKilled" and node0.failure["previous"]
    assert node0.label() == "node 0 (pod job-node-0-0-abc on gpu-a)"
    assert not node1.running and not node1.failure
    assert node1.state == "Pending (Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.)"
    assert node1.label() == "node 1 (pod job-node-0-1-def)"
