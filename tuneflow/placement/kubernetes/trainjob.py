"""Multi-node training on a Kubernetes `gpu` pool: the train stage submits a Kubeflow Trainer `TrainJob` and follows it.

When the training deployment (`tuneflow-train/gpu`) is on a Prefect work pool of type `kubernetes` and
train.nnodes > 1, an attempt is one TrainJob (`tuneflow.placement.kubernetes.manifest.render_trainjob`) instead of one
flow run per node:

    settings = pool_settings("tuneflow-train/gpu")        # None: not a Kubernetes pool
    run_trainjob(manifest, TrainJobApi.connect(), timeout_s, join_timeout, logger)

`pool_settings` reads the pool's base job template variables (their defaults, overridden by the deployment's
job_variables): image, namespace, gpu_count, node_selector, tolerations, secret_name, mlflow_tracking_uri, env.
`run_trainjob` creates the TrainJob with the official `kubernetes` client (in-cluster credentials in a pod, else the
kubeconfig), and follows it by the rules of `tuneflow.placement.group`: it logs each node's pod state as it
changes, and returns when the TrainJob's `Complete` condition is True. A `Failed` condition, or a node pod whose
container ended with an error, fails the attempt naming the node
(its rank is the pod's `batch.kubernetes.io/job-completion-index`, which the runtime also gives it as
PET_NODE_RANK), its exit code, reason and last error line; a node not running train.join_timeout seconds after the
first one started fails it too. On failure, timeout, cancellation or interrupt the TrainJob is deleted, so that
every node stops. The trained weights and the result reach the stage's MLflow run from node 0, as on other pools.

The pipeline's identity needs, in the TrainJob's namespace: get, list, watch, create, delete on
trainjobs.trainer.kubeflow.org, and get, list on pods and pods/log (infra/k8s/prefect-worker.yaml, Role
`tuneflow-trainjobs`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from tuneflow.core.errors import RunFailed, TuneflowError
from tuneflow.placement.group import GroupStatus, GroupWatch, NodesFailed, NodesLate, NodeStatus

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet puts it on every pod; the JobSet is named as the TrainJob
NODE_INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # the node rank (annotation; also a label since k8s 1.28)
INSTALL_HINT = "install Kubeflow Trainer as docs/infrastructure.md says (Kubernetes, step 1)"
RBAC = ("get, list, watch, create and delete on trainjobs.trainer.kubeflow.org and get, list on pods and pods/log "
        "(infra/k8s/prefect-worker.yaml: Role tuneflow-trainjobs, bound to the pipeline's service account)")


class TrainJobFailed(RunFailed):
    """The TrainJob of a training attempt failed (a node failed or never started); a retry may succeed."""


class KubernetesError(TuneflowError, RuntimeError):
    """The cluster could not be reached or refused the request: a setup problem that retrying does not fix."""


# --- the pool ----------------------------------------------------------------------------------------------------

def pool_settings(deployment: str) -> dict[str, Any] | None:
    """The kubernetes pool's job variables for ``deployment`` (template defaults overridden by the deployment's
    job_variables), or None when the deployment's pool is not of type `kubernetes`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        if not dep.work_pool_name:
            return None
        pool = client.read_work_pool(dep.work_pool_name)
    if pool.type != "kubernetes":
        return None
    properties = (pool.base_job_template or {}).get("variables", {}).get("properties", {})
    values = {name: spec.get("default") for name, spec in properties.items()}
    values.update({k: v for k, v in (dep.job_variables or {}).items() if v is not None})
    values["pool"] = pool.name
    if not values.get("image"):
        raise KubernetesError(f"work pool {pool.name} (deployment {deployment}) names no image: set the `image` job "
                              "variable to your registry's copy of infra/docker/gpu.Dockerfile")
    return values


def manifest_for(config, settings: dict[str, Any], name: str, request_json: str, labels: dict[str, str]) -> dict:
    """The TrainJob of one attempt, from the config and the pool's settings."""
    from tuneflow.placement.kubernetes.manifest import render_trainjob

    manifest = render_trainjob(
        config, settings["image"], name=name, namespace=settings.get("namespace") or "tuneflow",
        request_json=request_json, gpus_per_node=settings.get("gpu_count"),
        tracking_uri=settings.get("mlflow_tracking_uri"),
        secret_name=settings.get("secret_name") or "tuneflow-credentials",
        node_selector=settings.get("node_selector"), tolerations=settings.get("tolerations"),
        env={k: str(v) for k, v in (settings.get("env") or {}).items() if v is not None})
    manifest["metadata"]["labels"].update(labels)
    return manifest


# --- the API -----------------------------------------------------------------------------------------------------

@dataclass
class TrainJobApi:
    """The few Kubernetes API calls a training attempt makes, with errors that say what to do."""

    api_client: Any
    source: str  # where the credentials came from, for messages

    @classmethod
    def connect(cls) -> "TrainJobApi":
        """In-cluster credentials inside a pod (KUBERNETES_SERVICE_HOST), else the kubeconfig (KUBECONFIG or
        ~/.kube/config)."""
        try:
            from kubernetes import client, config
            from kubernetes.config.config_exception import ConfigException
        except ImportError:
            raise KubernetesError("the `kubernetes` Python client is missing: pip install 'kubernetes>=31'") from None
        configuration = client.Configuration()
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=configuration)
                source = "this pod's service account"
            else:
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                        client_configuration=configuration)
                source = f"kubeconfig {os.environ.get('KUBECONFIG') or '~/.kube/config'}"
        except (ConfigException, OSError) as exc:
            raise KubernetesError(
                "no Kubernetes credentials: this is not a pod (KUBERNETES_SERVICE_HOST is unset) and no kubeconfig "
                f"could be loaded (KUBECONFIG or ~/.kube/config: {exc}). Run the pipeline in the cluster, or give its "
                "worker a kubeconfig") from None
        return cls(client.ApiClient(configuration), source)

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    def _call(self, what: str, namespace: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise self._explain(exc, what, namespace) from None
        except HTTPError as exc:
            raise KubernetesError(f"cannot reach the Kubernetes API at {self.host} ({self.source}) to {what}: "
                                  f"{exc}") from None

    def _explain(self, exc, what: str, namespace: str) -> Exception:
        try:
            body = json.loads(exc.body or "{}")
        except ValueError:
            body = {}
        said = body.get("message") or exc.reason or ""
        where = f"the Kubernetes API at {self.host}"
        if exc.status == 401:
            return KubernetesError(f"{where} refused the credentials of {self.source} (401 Unauthorized) when asked "
                                   f"to {what}: renew them")
        if exc.status == 403:
            return KubernetesError(f"{where} refused to {what} in namespace {namespace} (403 Forbidden: {said}); "
                                   f"the pipeline's identity ({self.source}) needs {RBAC}")
        if exc.status == 404 and (body.get("details") or {}).get("kind") == "namespaces":
            return KubernetesError(f"namespace {namespace} does not exist at {where}: create it (kubectl create "
                                   "namespace), or set the pool's `namespace` job variable")
        if exc.status == 404 and "create" in what:
            return KubernetesError(f"{where} has no TrainJob API ({GROUP}/{VERSION} {PLURAL}: {said}): "
                                   f"{INSTALL_HINT}")
        return KubernetesError(f"{where} answered {exc.status} {exc.reason} when asked to {what}: {said}")

    def create(self, manifest: dict) -> dict:
        from kubernetes import client

        ns = manifest["metadata"]["namespace"]
        return self._call(f"create TrainJob {manifest['metadata']['name']}", ns,
                          client.CustomObjectsApi(self.api_client).create_namespaced_custom_object,
                          GROUP, VERSION, ns, PLURAL, manifest)

    def get(self, namespace: str, name: str) -> dict | None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            return client.CustomObjectsApi(self.api_client).get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._explain(exc, f"read TrainJob {name}", namespace) from None

    def delete(self, namespace: str, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            client.CustomObjectsApi(self.api_client).delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise self._explain(exc, f"delete TrainJob {name}", namespace) from None

    def pods(self, namespace: str, name: str) -> list[dict]:
        """The TrainJob's pods as plain JSON-like dicts (camelCase keys, as kubectl shows them)."""
        from kubernetes import client

        found = self._call(f"list the pods of TrainJob {name}", namespace,
                           client.CoreV1Api(self.api_client).list_namespaced_pod, namespace,
                           label_selector=f"{JOBSET_NAME_LABEL}={name}")
        return self.api_client.sanitize_for_serialization(found).get("items") or []

    def log_tail(self, namespace: str, pod: str, container: str, previous: bool = False, lines: int = 40) -> str:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return client.CoreV1Api(self.api_client).read_namespaced_pod_log(
                pod, namespace, container=container, tail_lines=lines, previous=previous) or ""
        except (ApiException, HTTPError):
            return ""  # the log is a courtesy in an error message; its absence is no error of its own


# --- following a TrainJob ------------------------------------------------------------------------------------------

@dataclass
class Node:
    """What one node's pod(s) say: its rank, pod, machine, state and, once it failed, why."""

    rank: int
    pod: str = ""
    host: str = ""
    state: str = "no pod yet"
    running: bool = False
    succeeded: bool = False
    failure: dict | None = None  # {exitCode, reason, message, finishedAt, previous}
    created: str = ""

    def label(self) -> str:
        where = f" on {self.host}" if self.host else ""
        return f"node {self.rank} (pod {self.pod}{where})" if self.pod else f"node {self.rank}"


def _rank(pod: dict) -> int | None:
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(NODE_INDEX_KEY) or (meta.get("labels") or {}).get(NODE_INDEX_KEY)
    return int(value) if value is not None and str(value).isdigit() else None


def _container(pod: dict, name: str) -> dict:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == name), statuses[0] if statuses else {})


def read_nodes(pods: list[dict], nnodes: int, container: str) -> list[Node]:
    """One Node per rank from the TrainJob's pods (a rank's failed pod counts even if the Job replaced it)."""
    nodes = [Node(rank) for rank in range(nnodes)]
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or ""):
        rank = _rank(pod)
        if rank is None or rank >= nnodes:
            continue
        node, status = nodes[rank], pod.get("status") or {}
        c = _container(pod, container)
        state, last = c.get("state") or {}, c.get("lastState") or {}
        failure = None
        for terminated, previous in ((state.get("terminated"), False), (last.get("terminated"), True)):
            if terminated and terminated.get("exitCode", 0) != 0:
                failure = {**terminated, "previous": previous}
                break
        if failure is None and status.get("phase") == "Failed":
            failure = {"reason": status.get("reason") or "Failed", "message": status.get("message") or ""}
        if node.failure is not None and failure is None:
            continue  # keep the failure of an earlier pod of this rank
        phase = status.get("phase") or "Pending"
        waiting = (state.get("waiting") or {})
        detail = waiting.get("reason") or next((f"{x.get('reason')}: {x.get('message')}" for x in
                                                status.get("conditions") or [] if x.get("status") == "False"
                                                and x.get("reason")), "")
        node.pod = (pod.get("metadata") or {}).get("name", "")
        node.host = (pod.get("spec") or {}).get("nodeName") or ""
        node.state = f"{phase} ({detail})" if detail and phase == "Pending" else phase
        node.running, node.succeeded = phase == "Running", phase == "Succeeded"
        node.failure = failure or node.failure
    return nodes


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith("tuneflow k8s node")]
    return (marked or lines or [""])[-1][:1500]


def describe_failure(node: Node, api: TrainJobApi, namespace: str, container: str) -> str:
    f = node.failure or {}
    code = f.get("exitCode")
    text = f"{node.label()}: " + (f"exit code {code}" if code is not None else "failed")
    if f.get("reason"):
        text += f" ({f['reason']})"
    message = (f.get("message") or "").strip()
    if not message and node.pod:
        message = _last_error_line(api.log_tail(namespace, node.pod, container, previous=bool(f.get("previous"))))
    return text + (f": {message}" if message else "")


def _condition(job: dict | None, kind: str) -> dict | None:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def run_trainjob(manifest: dict, api: TrainJobApi, timeout_s: float, join_timeout: float, logger) -> None:
    """Create the TrainJob and wait for it; TrainJobFailed naming the node(s) that failed or did not start,
    TimeoutError after ``timeout_s``. The TrainJob is deleted unless it completed."""
    from tuneflow.placement.kubernetes.manifest import NODE_CONTAINER

    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    trainer = manifest["spec"]["trainer"]
    nnodes = trainer["numNodes"]
    api.create(manifest)
    logger.info("TrainJob %s/%s submitted to %s: %d nodes x %d processes, image %s (kubectl -n %s get trainjob %s; "
                "pods: kubectl -n %s get pods -l %s=%s)", ns, name, api.host, nnodes, trainer["numProcPerNode"],
                trainer["image"], ns, name, ns, JOBSET_NAME_LABEL, name)

    def read() -> GroupStatus:
        job = api.get(ns, name)
        if job is None:
            raise TrainJobFailed(f"TrainJob {ns}/{name} was deleted while it ran")
        nodes = read_nodes(api.pods(ns, name), nnodes, NODE_CONTAINER)
        condition = _condition(job, "Failed")
        return GroupStatus([NodeStatus(n.rank, n.label(), n.state, started=n.running or n.succeeded or bool(n.failure),
                                       ended=n.succeeded or bool(n.failure), failed=bool(n.failure),
                                       ended_at=(n.failure or {}).get("finishedAt") or "", source=n) for n in nodes],
                           complete=bool(_condition(job, "Complete")),
                           failure=condition and f"TrainJob {condition.get('reason')}: "
                                                 f"{condition.get('message') or 'no message'}")

    watch = GroupWatch(read, join_timeout, timeout_s, logger, prefix=f"TrainJob {name}: ")
    try:  # TrainJobFailed, a timeout, or this pipeline cancelled / interrupted: the TrainJob is deleted
        try:
            watch.follow(f"TrainJob {ns}/{name}", "it was deleted")
            logger.info("TrainJob %s: Complete", name)
        except NodesLate as exc:
            raise TrainJobFailed("; ".join(
                f"{n.label} did not start within train.join_timeout={join_timeout:g}s of the first node ({n.state})"
                for n in exc.late) + f"; TrainJob {ns}/{name} was deleted") from None
        except NodesFailed as exc:
            reasons = [describe_failure(n.source, api, ns, NODE_CONTAINER) for n in exc.status.failed]
            if exc.status.failure and not reasons:
                reasons.append(exc.status.failure)
            raise TrainJobFailed(f"multi-node training failed (TrainJob {ns}/{name}): " + "; ".join(reasons)
                                 + "; the TrainJob was deleted") from None
    except BaseException:
        try:
            api.delete(ns, name)
        except Exception as exc:  # noqa: BLE001 - the first error is the one to report
            logger.warning("could not delete TrainJob %s/%s: %s", ns, name, exc)
        raise
