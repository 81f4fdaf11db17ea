"""Multi-node training from one pipeline run, on loopback: 2 nodes x 1 process (gloo on the CPU).

The team of tests/integration/test_team.py (a Prefect server, an MLflow server, `make deploy`, process workers each on
its own "machine" that sees no other's folders), with the training deployment allowed two runs at once and two `gpu`
workers: the train stage starts one flow run per node, node 0 publishes its address through the Prefect API and node 1
joins it. A node that never joins, or dies, fails the attempt naming it; a retry relaunches the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Iterator

import pytest

from tests.support.servers import training_rank_pid
from tests.support.team import (
    Team,
    mlflow_runs,
    start_team,
    submit,
    summary_of,
    tiny_config,
    training_runs,
    wait_final,
    worker,
    worker_log,
)


@pytest.fixture(scope="module")
def team(prefect_api, hub_mirror, tmp_path_factory) -> Iterator[Team]:
    with start_team(prefect_api, hub_mirror, tmp_path_factory, gpu_concurrency=2) as team:
        yield team


def logs(team: Team) -> str:
    return "\n".join(f"--- {m} ---\n{worker_log(team, m, pool)}"
                     for m, pool in (("cpu", "cpu"), ("gpu-1", "gpu"), ("gpu-2", "gpu")))


def nodes_started(team: Team, run, deadline: float) -> str:
    """Once the pipeline run has started its two node runs: the train stage's MLflow run id."""
    while len(training_runs(run.id)) < 2:
        assert time.monotonic() < deadline, logs(team)
        time.sleep(1)
    return training_runs(run.id)[0].parameters["request"]["mlflow_run_id"]


@pytest.mark.slow
def test_a_node_that_never_joins_is_named_and_the_relaunched_group_trains_one_adapter(team):
    """One GPU machine at first: the node it cannot take never joins, and the attempt fails naming it within
    train.join_timeout. With the second machine up, the retry relaunches both nodes, which train one adapter."""
    from mlflow import MlflowClient
    from prefect.variables import Variable

    config = tiny_config(team, "two-nodes", nnodes=2, join_timeout=45, retries=1)
    mlflow = MlflowClient(team.mlflow)
    with contextlib.ExitStack() as machines:
        machines.enter_context(worker(team, "cpu", "cpu"))
        machines.enter_context(worker(team, "gpu", "gpu-1"))
        run = submit(config)
        deadline = time.monotonic() + 600
        train_run_id = nodes_started(team, run, deadline)
        while "attempt_1_error" not in mlflow.get_run(train_run_id).data.tags:
            assert time.monotonic() < deadline, logs(team)
            time.sleep(1)
        machines.enter_context(worker(team, "gpu", "gpu-2"))  # the second machine comes up for the retry
        run = wait_final(run.id, 900, lambda: logs(team))
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{logs(team)}"

    nodes = training_runs(run.id)
    attempts: dict[str, list] = {}
    for node in nodes:
        attempts.setdefault(node.parameters["request"]["rendezvous_id"], []).append(node)
    assert len(attempts) == 2 and all(len(group) == 2 for group in attempts.values()), attempts
    first, second = (attempts[rdzv] for rdzv in sorted(attempts))
    for rdzv in attempts:
        assert Variable.get(f"tuneflow-rdzv-{rdzv}") is None  # every attempt's rendezvous is cleaned up

    # Attempt 1: the node no machine took is named, with the timeout; the node that ran was cancelled.
    [late] = [n for n in first if "prefect.worker.name" not in (n.labels or {})]
    late_rank = late.parameters["request"]["node_rank"]
    error = mlflow.get_run(train_run_id).data.tags["attempt_1_error"]
    assert f"node {late_rank}" in error and "train.join_timeout=45" in error, error
    assert not any(n.state.is_completed() for n in first), [n.state.name for n in first]

    # Attempt 2: both nodes, one on each machine, world size 2, one adapter, the loss logged once per step.
    assert sorted(n.parameters["request"]["node_rank"] for n in second) == [0, 1]
    assert all(n.state.is_completed() and n.work_pool_name == "gpu" for n in second)
    assert {n.labels["prefect.worker.name"] for n in second} == {"gpu-1", "gpu-2"}
    parent, children = mlflow_runs(team, run.id)
    train = summary_of(team, parent, team.folder("client") / "two-nodes")["stages"]["train"]
    assert (train["nnodes"], train["world_size"], train["nproc"], train["global_step"]) == (2, 2, 1, 12), train
    assert train["attempts"] == 2, train
    train_run = children["train"]
    assert train_run.info.run_id == train_run_id
    assert (train_run.data.params["nnodes"], train_run.data.params["world_size"]) == ("2", "2")
    top = {a.path for a in mlflow.list_artifacts(train_run_id)}
    assert "adapter" in top and "model" not in top, top  # one adapter, published by node 0
    adapter = {os.path.basename(a.path) for a in mlflow.list_artifacts(train_run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter, adapter
    steps = [m.step for m in mlflow.get_metric_history(train_run_id, "loss")]
    assert sorted(steps) == list(range(1, 13)), steps  # rank 0 only: once per step, not once per node
    # Both machines trained: node 1 ran torchrun as global rank 1 of 2 and logged nothing to MLflow itself.
    node1 = next(n for n in second if n.parameters["request"]["node_rank"] == 1)
    node1_log = worker_log(team, node1.labels["prefect.worker.name"], "gpu", tail=None)
    assert "joining the rendezvous at 127.0.0.1:" in node1_log and "node 1: training finished" in node1_log


@pytest.mark.slow
def test_a_node_killed_mid_run_fails_the_stage_naming_it(team):
    from mlflow import MlflowClient

    config = tiny_config(team, "two-nodes-killed", nnodes=2, join_timeout=60, max_steps=400, save_steps=1000)
    mlflow = MlflowClient(team.mlflow)
    with worker(team, "cpu", "cpu"), worker(team, "gpu", "gpu-1"), worker(team, "gpu", "gpu-2"):
        run = submit(config)
        deadline = time.monotonic() + 600
        train_run_id = nodes_started(team, run, deadline)
        pid = None
        while pid is None:  # both nodes train: steps reach MLflow; then kill node 1's training process
            assert time.monotonic() < deadline, logs(team)
            if mlflow.get_metric_history(train_run_id, "loss"):
                pid = training_rank_pid(1, in_environ=f"MLFLOW_RUN_ID={train_run_id}")
            time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        # Bounded: the failure grace (20 s) and polling, far below train.join_timeout + the test's limit.
        run = wait_final(run.id, 180, lambda: logs(team))
        nodes = training_runs(run.id)
        nodes = [wait_final(n.id, 120, lambda: logs(team)) for n in nodes]
        while training_rank_pid(0, in_environ=f"MLFLOW_RUN_ID={train_run_id}") is not None:
            assert time.monotonic() < deadline, "node 0 still trains after the stage failed"
            time.sleep(0.5)

    assert run.state.is_failed(), f"{run.state.name}: {run.state.message}"
    node1 = next(n for n in nodes if n.parameters["request"]["node_rank"] == 1)
    worker1 = node1.labels["prefect.worker.name"]
    message = run.state.message
    assert f"node 1 (flow run {node1.name} on worker {worker1})" in message, message
    assert "rank 1: exit code -9 (SIGKILL)" in message, message
    assert node1.state.is_failed() and not any(n.state.is_completed() for n in nodes)
    parent, children = mlflow_runs(team, run.id)
    summary = summary_of(team, parent, team.folder("client") / "killed")
    assert summary["failed_stage"] == "train" and "node 1" in summary["stages"]["train"]["error"]
    assert children["train"].info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("nnodes", [1, 2])
def test_workers_sharing_one_home_finish_every_run(team, nnodes):
    """One machine as `make stack` runs it: the cpu and both gpu workers share HOME, the Hub cache and the tuneflow
    cache, each with its own TMPDIR and Prefect home. A worker deletes a flow run's folder when the run ends, so what
    a later stage reads through the shared cache must not live there: every consecutive run completes."""
    with contextlib.ExitStack() as machines:
        for pool, machine in (("cpu", "cpu"), ("gpu", "gpu-1"), ("gpu", "gpu-2")):
            machines.enter_context(worker(team, pool, machine, home="shared-home"))
        for i in range(3):
            run = submit(tiny_config(team, f"shared-home-{nnodes}-{i}", nnodes=nnodes, join_timeout=120))
            run = wait_final(run.id, 600, lambda: logs(team))
            assert run.state.is_completed(), f"run {i + 1}: {run.state.name}: {run.state.message}\n{logs(team)}"
            assert len(training_runs(run.id)) == nnodes
    cache = team.folder("shared-home") / "tuneflow-cache" / "artifacts"
    assert not [p for p in cache.iterdir() if p.is_symlink()], "the cache holds pointers into flow-run folders"


def test_tuneflow_run_refuses_several_nodes_without_a_deployment(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tuneflow = Path(sys.executable).parent / "tuneflow"
    done = subprocess.run([str(tuneflow), "run", "--config", "configs/demo.yaml", "--set", "train.nnodes=2",
                           "--set", f"output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "train.nnodes=2" in done.stderr and "tuneflow-train/gpu" in done.stderr, done.stderr
    assert "docs/infrastructure.md" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
