"""A STAND-IN for Kubernetes, not Kubernetes: no cluster can run where tuneflow is tested (no container runtime, and no
kube-apiserver binary in any package registry reachable here). It answers, on loopback, the few Kubernetes API calls
the train stage makes, and plays Kubeflow Trainer's `torch-distributed` runtime for the TrainJobs it receives:

- `POST/GET/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]`: a TrainJob is checked
  against the vendored CRD's OpenAPI schema (unknown fields refused, as `kubectl apply --validate=strict` does) and
  kept; deleting it stops its "pods";
- `GET /api/v1/namespaces/{ns}/pods?labelSelector=jobset.sigs.k8s.io/jobset-name=NAME` and `.../pods/{pod}/log`;
- bearer-token authentication from a kubeconfig (401 on a wrong token), and switches for a cluster without the
  TrainJob CRD (404) and an identity without the RBAC (403), with the bodies a real API server sends.

Each node of a TrainJob is a "pod": the TrainJob's command (`tuneflow k8s node`, from this environment's bin folder as
the image's PATH has it) run as a local process
with only the container's environment (`value`s, `secretKeyRef`s resolved from the `secrets` given here), the PET_*
variables the torch runtime sets (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR=127.0.0.1,
PET_MASTER_PORT), its own folder for each volume (paths under a volume's mountPath in the environment point there),
and pod labels/annotations as JobSet sets them (`jobset.sigs.k8s.io/jobset-name`,
`batch.kubernetes.io/job-completion-index`). Pod phases and the TrainJob's `Complete`/`Failed` conditions follow
the processes' exit codes. Scheduling, images, GPUs, restarts, Services and DNS are not played.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import yaml

from tests.support.trainjob_schema import strict_trainjob_validator
from tuneflow.core.ports import free_port

TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
INDEX = "batch.kubernetes.io/job-completion-index"
JOBSET = "jobset.sigs.k8s.io/jobset-name"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Pod:
    name: str
    rank: int
    folder: Path
    proc: subprocess.Popen | None = None
    created: str = field(default_factory=now)
    started: str | None = None
    finished: str | None = None
    exit_code: int | None = None
    waiting: str | None = "ContainerCreating"

    @property
    def log(self) -> Path:
        return self.folder / "pod.log"

    @property
    def phase(self) -> str:
        if self.exit_code is not None:
            return "Succeeded" if self.exit_code == 0 else "Failed"
        return "Running" if self.proc is not None else "Pending"


@dataclass
class Job:
    manifest: dict
    pods: list[Pod] = field(default_factory=list)
    conditions: list[dict] = field(default_factory=list)
    deleted: bool = False


class StandIn:
    """The stand-in's state and its HTTP server; see the module docstring."""

    def __init__(self, root: Path, secrets: dict[str, dict[str, str]], token: str = "stand-in-token"):
        self.root, self.secrets, self.token = Path(root), secrets, token
        self.validator = strict_trainjob_validator()
        self.crd_installed, self.allowed = True, True
        self.jobs: dict[tuple[str, str], Job] = {}
        self.submitted: list[dict] = []  # every TrainJob as received, valid or not
        self.history: dict[str, Job] = {}  # every TrainJob created, by name, deleted ones too
        self.deleted: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    # --- the client's view ---------------------------------------------------------------------------------------
    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in", "preferences": {},
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "pipeline", "user": {"token": token or self.token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "pipeline",
                                                          "namespace": "tuneflow"}}],
        }))
        return path

    # --- Kubeflow Trainer's torch runtime, played -----------------------------------------------------------------
    def _container_env(self, job: Job, pod: Pod, port: int) -> dict[str, str] | str:
        """The pod's environment, or why the container could not be created."""
        trainer = job.manifest["spec"]["trainer"]
        (patch,) = job.manifest["spec"].get("runtimePatches") or [{}]
        pod_spec = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
            "template"]["spec"]
        mounts = {m["mountPath"]: pod.folder / "volumes" / m["name"]
                  for c in pod_spec.get("containers", []) for m in c.get("volumeMounts", [])}
        for folder in mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        (pod.folder / "home").mkdir(exist_ok=True)
        env = {"PATH": os.environ["PATH"], "HOME": str(pod.folder / "home"), "TMPDIR": str(pod.folder / "home"),
               "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", "HOSTNAME": pod.name}
        for var in trainer.get("env", []):
            if "value" in var:
                value = var["value"]
                for mount, folder in mounts.items():
                    if value == mount or value.startswith(mount + "/"):
                        value = str(folder) + value[len(mount):]
                env[var["name"]] = value
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                secret = self.secrets.get(ref["name"])
                if secret is None or ref["key"] not in secret:
                    if ref.get("optional"):
                        continue
                    return f'CreateContainerConfigError: secret "{ref["name"]}" has no key {ref["key"]}'
                env[var["name"]] = secret[ref["key"]]
        env.update(PET_NNODES=str(trainer["numNodes"]), PET_NPROC_PER_NODE=str(trainer["numProcPerNode"]),
                   PET_NODE_RANK=str(pod.rank), PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port))
        return env

    def _run(self, job: Job) -> None:
        """Start the pods' processes, then follow them until they end or the job is deleted."""
        port = free_port()
        command = list(job.manifest["spec"]["trainer"]["command"])
        command = [str(Path(sys.executable).with_name(command[0])), *command[1:]]  # the image: venv on PATH
        for pod in job.pods:
            env = self._container_env(job, pod, port)
            if isinstance(env, str):
                pod.waiting = env
                continue
            with open(pod.log, "ab") as log:
                pod.proc = subprocess.Popen(command, env=env, cwd=pod.folder, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            pod.started, pod.waiting = now(), None
        while not job.deleted:
            for pod in job.pods:
                if pod.proc is not None and pod.exit_code is None and pod.proc.poll() is not None:
                    pod.exit_code, pod.finished = pod.proc.returncode, now()
            phases = [p.phase for p in job.pods]
            if not job.conditions and "Failed" in phases:  # JobSet's default failure policy: no restarts
                job.conditions.append({"type": "Failed", "status": "True", "reason": "FailedJobs",
                                       "message": "jobset failed due to one or more job failures",
                                       "lastTransitionTime": now()})
            if not job.conditions and all(p == "Succeeded" for p in phases):
                job.conditions.append({"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
                                       "message": "jobset completed successfully", "lastTransitionTime": now()})
            if all(p.exit_code is not None or p.proc is None and p.waiting is None for p in job.pods):
                return
            time.sleep(0.2)

    def _stop(self, job: Job, grace: float = 10) -> None:
        """Deleting a TrainJob deletes its pods: SIGTERM to each pod's processes, SIGKILL after the grace period."""
        job.deleted = True
        running = [p for p in job.pods if p.proc is not None and p.proc.poll() is None]
        for pod in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for pod in running:
            try:
                pod.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.proc.pid, signal.SIGKILL)  # what the container's end does to anything left in it

    def pod_json(self, job: Job, pod: Pod) -> dict:
        name = job.manifest["metadata"]["name"]
        state: dict = {"waiting": {"reason": pod.waiting.split(":")[0], "message": pod.waiting}} if pod.waiting else {}
        if pod.phase == "Running":
            state = {"running": {"startedAt": pod.started}}
        elif pod.exit_code is not None:
            state = {"terminated": {"exitCode": pod.exit_code, "reason": "Completed" if pod.exit_code == 0 else "Error",
                                    "startedAt": pod.started, "finishedAt": pod.finished}}
        labels = {JOBSET: name, "jobset.sigs.k8s.io/replicatedjob-name": "node", "jobset.sigs.k8s.io/job-index": "0",
                  INDEX: str(pod.rank), "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": job.manifest["metadata"]["namespace"], "uid": str(uuid.uuid4()),
                         "creationTimestamp": pod.created, "labels": labels, "annotations": {INDEX: str(pod.rank)}},
            "spec": {"nodeName": "stand-in", "containers": [{"name": "node",
                                                             "image": job.manifest["spec"]["trainer"]["image"]}]},
            "status": {"phase": pod.phase, "containerStatuses": [{
                "name": "node", "image": job.manifest["spec"]["trainer"]["image"], "imageID": "",
                "ready": pod.phase == "Running",
                "restartCount": 0, "state": state}]},
        }

    def job_json(self, job: Job) -> dict:
        return {**job.manifest, "status": {"conditions": list(job.conditions)}}

    # --- HTTP ----------------------------------------------------------------------------------------------------
    def _create(self, ns: str, body: dict) -> tuple[int, dict]:
        self.submitted.append(body)
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in self.validator.iter_errors(body)]
        env = [e["name"] for e in ((body.get("spec") or {}).get("trainer") or {}).get("env", [])]
        errors += [f"spec.trainer.env: {n} is set by the runtime" for n in env if n.startswith("PET_")]
        if errors:
            return 422, status(422, "Invalid", "TrainJob is invalid: " + "; ".join(errors))
        name = body["metadata"]["name"]
        with self.lock:
            if (ns, name) in self.jobs:
                return 409, status(409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists')
            body = {**body, "metadata": {**body["metadata"], "uid": str(uuid.uuid4()), "creationTimestamp": now()}}
            job = Job(body)
            folder = self.root / name
            for rank in range(body["spec"]["trainer"]["numNodes"]):
                (folder / f"node-{rank}").mkdir(parents=True)
                job.pods.append(Pod(f"{name}-node-0-{rank}-{uuid.uuid4().hex[:5]}", rank, folder / f"node-{rank}"))
            self.jobs[(ns, name)] = self.history[name] = job
        threading.Thread(target=self._run, args=(job,), daemon=True).start()
        return 201, self.job_json(job)

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, code: int, body, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def route(self, method: str) -> None:
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    return self.reply(401, status(401, "Unauthorized", "Unauthorized"))
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if m := TRAINJOBS.match(url.path):
                    ns, name = m.groups()
                    if not standin.crd_installed:
                        return self.reply(404, status(404, "NotFound",
                                                      "the server could not find the requested resource"))
                    if not standin.allowed:
                        verb = {"POST": "create", "DELETE": "delete"}.get(method, "get")
                        return self.reply(403, status(403, "Forbidden",
                            f'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:{ns}:default" '
                            f'cannot {verb} resource "trainjobs" in API group "trainer.kubeflow.org" in the '
                            f'namespace "{ns}"'))
                    if method == "POST" and not name:
                        length = int(self.headers.get("Content-Length") or 0)
                        return self.reply(*standin._create(ns, json.loads(self.rfile.read(length))))
                    job = standin.jobs.get((ns, name))
                    if job is None:
                        return self.reply(404, status(404, "NotFound",
                                                      f'trainjobs.trainer.kubeflow.org "{name}" not found'))
                    if method == "GET":
                        return self.reply(200, standin.job_json(job))
                    if method == "DELETE":
                        standin.deleted.append(name)
                        with standin.lock:
                            del standin.jobs[(ns, name)]
                        standin._stop(job)
                        return self.reply(200, status(200, "Success", "", "Success"))
                if method == "GET" and (m := PODS.match(url.path)):
                    ns, selector = m[1], query.get("labelSelector", "")
                    wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
                    items = [standin.pod_json(job, pod) for (jns, _), job in list(standin.jobs.items()) if jns == ns
                             for pod in job.pods]
                    items = [p for p in items if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
                    return self.reply(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                if method == "GET" and (m := POD_LOG.match(url.path)):
                    pod = next((p for (jns, _), job in list(standin.jobs.items()) if jns == m[1] for p in job.pods
                                if p.name == m[2]), None)
                    if pod is None:
                        return self.reply(404, status(404, "NotFound", f'pods "{m[2]}" not found'))
                    lines = pod.log.read_text(errors="replace").splitlines() if pod.log.is_file() else []
                    tail = int(query.get("tailLines") or len(lines) or 1)
                    return self.reply(200, "\n".join(lines[-tail:]) + "\n", "text/plain")
                return self.reply(404, status(404, "NotFound", "the server could not find the requested resource"))

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

            def do_DELETE(self):
                self.route("DELETE")

        return Handler

    def node_log(self, name: str, rank: int) -> str:
        path = self.root / name / f"node-{rank}" / "pod.log"
        return path.read_text(errors="replace") if path.is_file() else "(no log)"

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.parent.parent.name} {p.parent.name} ---\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.root.glob("*/node-*/pod.log")))


def status(code: int, reason: str, message: str, state: str = "Failure") -> dict:
    """A metav1.Status, as the API server answers errors."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": state, "message": message,
            "reason": reason, "code": code}


@contextlib.contextmanager
def stand_in(root: Path, secrets: dict[str, dict[str, str]]) -> Iterator[StandIn]:
    """Serve a StandIn on a free loopback port; on exit, stop every pod it started."""
    s = StandIn(root, secrets)
    thread = threading.Thread(target=s.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s
    finally:
        s.server.shutdown()
        for job in list(s.jobs.values()):
            s._stop(job, grace=5)
