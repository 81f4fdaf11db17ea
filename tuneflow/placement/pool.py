"""Training on the GPU work pool: an attempt as one flow run of the training deployment, or as one flow run per
node meeting under a rendezvous id (train.nnodes > 1), or as a Kubeflow TrainJob when the pool is of type
kubernetes. Each waits for its runs, fails with the training run's own error naming the node, and cancels what is
left when the pipeline stops waiting; the result is read from the stage's MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.errors import RunFailed
from tuneflow.core.progress import StateLog
from tuneflow.core.results import TrainRequest, TrainResult
from tuneflow.placement.group import POLL_SECONDS, GroupStatus, GroupWatch, NodesFailed, NodesLate, NodeStatus

DEPLOYMENTS_HINT = ("README 'Run it on a team's Prefect server': make deploy, a `tuneflow worker --pool gpu` on "
                    "each GPU machine, then submit the pipeline with train_deployment=tuneflow-train/gpu; or train on "
                    "Kubernetes as a TrainJob (docs/infrastructure.md)")


class TrainingRunFailed(RunFailed):
    """A training attempt that ended without a result; the message is the training run's own."""


def placement_problem(cfg: TuneflowConfig, deployment: str | None) -> str | None:
    """Why this config cannot train where it is asked to, or None: several nodes need the training deployment."""
    if cfg.train.nnodes > 1 and not deployment:
        return (f"train.nnodes={cfg.train.nnodes}: training on several GPU machines runs through the training "
                f"deployment, one flow run per node; this run has none. See {DEPLOYMENTS_HINT}")
    return None


def run_on_pool(deployment: str, request: TrainRequest, timeout_s: float, logger) -> TrainResult:
    """One attempt as a flow run of ``deployment``; raise TrainingRunFailed with its error if it does not complete."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    # timeout=0: create the run and return, so that this task can cancel it (run_deployment would only poll).
    child = run_deployment(deployment, parameters={"request": request.model_dump(mode="json")}, timeout=0,
                           as_subflow=True)
    logger.info("training runs as flow run %s of %s (pool %s)", child.name, deployment, child.work_pool_name)
    deadline, log = time.monotonic() + timeout_s, StateLog(lambda text: logger.info("%s", text))
    with get_client(sync_client=True) as client:
        try:
            while True:
                child = client.read_flow_run(child.id)
                state = child.state
                log.note(child.id, f"training run {child.name}: {state.name}")
                if state.is_final():
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"training run {child.name} did not finish within train.timeout_hours="
                                       f"{timeout_s / 3600:g} (state {state.name}); it was cancelled")
                time.sleep(POLL_SECONDS)
        except BaseException:  # timeout, or this pipeline cancelled / interrupted: the training run stops too
            client.set_flow_run_state(child.id, Cancelling(message="the pipeline run stopped waiting"), force=True)
            raise
    if state.is_cancelled():  # by a person, on purpose: not retried
        raise RuntimeError(f"training run {child.name} was cancelled: {state.message or 'no message'}")
    if not state.is_completed():
        raise TrainingRunFailed(f"training run {child.name} {state.name}: {state.message or 'no message'}")
    return result_from_mlflow(request)


def result_from_mlflow(request: TrainRequest) -> TrainResult:
    """The TrainResult node 0 logged to the stage's MLflow run."""
    from mlflow import MlflowClient

    from tuneflow.training.launch.run import RESULT_ARTIFACT

    path = MlflowClient(request.tracking_uri).download_artifacts(request.mlflow_run_id, RESULT_ARTIFACT)
    return TrainResult.model_validate(json.loads(Path(path).read_text()))


def run_trainjob_on_pool(settings: dict, request: TrainRequest, attempt: int, timeout_s: float, logger) -> TrainResult:
    """One multi-node attempt as a Kubeflow Trainer TrainJob on the Kubernetes pool described by ``settings``
    (`tuneflow.placement.kubernetes.trainjob.pool_settings`); raise TrainingRunFailed naming the node that failed or
    never started."""
    from tuneflow.placement.kubernetes.manifest import attempt_name
    from tuneflow.placement.kubernetes.trainjob import TrainJobApi, TrainJobFailed, manifest_for, run_trainjob

    name = attempt_name(request.run_folder, request.mlflow_run_id, attempt)
    request = request.model_copy(update={"rendezvous_id": name})
    manifest = manifest_for(request.config, settings, name, request.model_dump_json(),
                            {"tuneflow/mlflow-run-id": request.mlflow_run_id, "tuneflow/attempt": str(attempt)})
    logger.info("training on %d nodes as a Kubeflow TrainJob (work pool %s is of type kubernetes)",
                request.config.train.nnodes, settings["pool"])
    try:
        run_trainjob(manifest, TrainJobApi.connect(), timeout_s, request.config.train.join_timeout, logger)
    except TrainJobFailed as exc:
        raise TrainingRunFailed(str(exc)) from exc
    return result_from_mlflow(request)


def _node_label(rank: int, run) -> str:
    worker = (run.labels or {}).get("prefect.worker.name")
    return f"node {rank} (flow run {run.name}" + (f" on worker {worker})" if worker else ", not picked up by a worker)")


def run_group_on_pool(deployment: str, request: TrainRequest, rdzv_id: str, timeout_s: float, logger) -> TrainResult:
    """One multi-node attempt: one flow run of ``deployment`` per node; raise TrainingRunFailed naming the node
    that failed or never joined, after cancelling the others."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from tuneflow.training.launch import rendezvous

    t = request.config.train
    with get_client(sync_client=True) as client:
        limit = client.read_deployment_by_name(deployment).global_concurrency_limit
    if limit is not None and limit.limit < t.nnodes:  # the nodes could never all run at once
        raise RuntimeError(f"train.nnodes={t.nnodes} but deployment {deployment} runs at most {limit.limit} flow "
                           f"run(s) at once: its nodes could never meet. Redeploy it with a limit of at least "
                           f"{t.nnodes} (make deploy GPU_CONCURRENCY={t.nnodes}) and run a gpu worker on each of "
                           f"{t.nnodes} machines")
    runs = []
    for rank in range(t.nnodes):
        node_request = request.model_copy(update={"node_rank": rank, "rendezvous_id": rdzv_id})
        runs.append(run_deployment(deployment, parameters={"request": node_request.model_dump(mode="json")},
                                   flow_run_name=f"{request.run_folder}-node{rank}-{rdzv_id[-4:]}", timeout=0,
                                   as_subflow=True))
    logger.info("training on %d nodes: flow runs %s of %s (pool %s), rendezvous %s", t.nnodes,
                ", ".join(r.name for r in runs), deployment, runs[0].work_pool_name, rdzv_id)
    with get_client(sync_client=True) as client:

        def cancel_unfinished(message: str) -> None:
            for run in runs:
                if not run.state.is_final():
                    client.set_flow_run_state(run.id, Cancelling(message=message), force=True)

        def read() -> GroupStatus:
            runs[:] = [client.read_flow_run(r.id) for r in runs]
            return GroupStatus([NodeStatus(rank, _node_label(rank, r), r.state.name,
                                           started=r.state.is_running() or r.state.is_final(), ended=r.state.is_final(),
                                           failed=r.state.is_final() and not r.state.is_completed(),
                                           ended_at=str(r.state.timestamp), source=r) for rank, r in enumerate(runs)])

        watch = GroupWatch(read, t.join_timeout, timeout_s, logger)
        try:
            watch.follow("multi-node training", "its node runs were cancelled")
        except NodesLate as exc:
            cancel_unfinished("a node did not join")
            raise TrainingRunFailed("; ".join(
                f"{n.label} did not join within train.join_timeout={t.join_timeout:g}s (state {n.state}: is a gpu "
                "worker free for every node?)" for n in exc.late) + "; the other nodes were cancelled") from None
        except NodesFailed as exc:
            cancel_unfinished("another node failed")
            ended = exc.status.failed
            if all(n.source.state.is_cancelled() for n in ended):  # by a person, on purpose: not retried
                raise RuntimeError("; ".join(f"{n.label} was cancelled: {n.source.state.message or 'no message'}"
                                             for n in ended)) from None
            raise TrainingRunFailed("multi-node training failed: " + "; ".join(
                f"{n.label} {n.state}: {n.source.state.message or 'no message'}"
                for n in ended if not n.source.state.is_cancelled()) + "; the other nodes were cancelled") from None
        except BaseException:  # timeout, or this pipeline cancelled / interrupted: every node stops
            cancel_unfinished("the pipeline run stopped waiting")
            raise
        finally:
            rendezvous.remove(rdzv_id)
    return result_from_mlflow(request)
