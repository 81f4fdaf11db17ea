"""`tuneflow sweep` end to end on the tiny model: trials of the pipeline proposed by Optuna, each nested under the
sweep's MLflow run with its values as params; killed after two finished trials and started again, the sweep resumes
the study, runs a trial cut off midway again and only the trials still missing, and with --register puts the best
trial's export through the gate of `tuneflow retrain`. On the team servers (tests/support/team.py): the sweep
submitted to tuneflow-sweep/on-demand, two trials at a time on two gpu machines, a hopeless trial pruned, the best
decided against a champion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.support.team import Team, machine_env, start_team, tiny_config, worker, worker_log

pytestmark = pytest.mark.slow
TRIALS = 3


def sweep_command(tmp_path: Path, tiny_assets, prefect_api: str, space: dict | None = None,
                  **sections) -> tuple[list[str], dict]:
    """`tuneflow sweep` of the tiny model over ``space`` (the learning rate and LoRA rank by default); ``sections``
    replace the config's."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": "search",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_assets["model"])},
        "dataset": {"name_or_path": str(tiny_assets["data"]), "eval_size": 16},
        "prep": {"cutoff_len": 128},
        "train": {"method": "lora", "max_steps": 8, "per_device_batch_size": 8, "deepspeed": "none",
                  "nproc_per_node": 1, "save_steps": 100, "retries": 0, "precision": "fp32"},
        "eval": {"max_samples": 8, "max_new_tokens": 4, "batch_size": 8, "compare_base": False},
        "export": {"max_shard_size": "2MB", "dtype": "fp32", "parity_samples": 2},
        "registry": {"model_name": "searched", "eval_samples": 8},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "sweep"},
        "sweep": {"sampler": "random", "seed": 3, "trials": TRIALS},
        **sections,
    }))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space or {"train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
                                                   "train.lora.rank": [4, 8]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_", "TUNEFLOW_"))}
    env.update(TUNEFLOW_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PREFECT_API_URL=prefect_api)
    return [str(Path(sys.executable).parent / "tuneflow"), "sweep", "--config", str(config), "--space",
            str(space_file)], env


def states(storage: str) -> list[str]:
    import optuna

    try:
        study = optuna.load_study(study_name="search", storage=storage)
    except KeyError:  # not created yet
        return []
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_a_sweep_nests_its_trials_and_resumes_after_a_kill(tmp_path, tiny_assets, prefect_api):
    from mlflow import MlflowClient

    command, env = sweep_command(tmp_path, tiny_assets, prefect_api)
    storage = f"sqlite:///{tmp_path}/optuna.db"  # next to the MLflow store
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and states(storage) != ["COMPLETE", "COMPLETE", "RUNNING"]:
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read()[-4000:]
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its third trial's pipeline, midway
    first.wait()
    assert states(storage) == ["COMPLETE", "COMPLETE", "RUNNING"]

    again = subprocess.run([*command, "--register"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-6000:]
    result = json.loads(again.stdout.strip().splitlines()[-1])
    trials = result["trials"]
    complete = [t for t in trials if t["state"] == "complete"]
    cut_off = [t for t in trials if t["state"] == "interrupted"]
    assert len(complete) == TRIALS and len(cut_off) == 1 and len(trials) == TRIALS + 1, trials
    assert trials[3]["params"] == cut_off[0]["params"] == trials[2]["params"], trials  # run again, first
    best = min(complete, key=lambda t: t["value"])  # eval_loss: lower is better
    assert (result["best_trial"], result["best_value"], result["best_params"]) == (
        best["number"], best["value"], best["params"]), result

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    sweep = client.get_run(result["sweep"])
    assert sweep.data.tags["tuneflow.sweep.study"] == "search" and sweep.info.status == "FINISHED"
    assert float(sweep.data.tags["best.train.learning_rate"]) == pytest.approx(best["params"]["train.learning_rate"])
    assert sweep.data.metrics["best.eval_loss"] == pytest.approx(best["value"])
    assert {"optuna/optimization_history.png", "optuna/param_importances.png"} <= {
        f.path for f in client.list_artifacts(result["sweep"], "optuna")}
    for t in complete:  # each trial a pipeline run nested under the sweep, its values among its params
        run = client.get_run(t["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == result["sweep"] == run.data.tags["tuneflow.sweep"]
        assert run.data.tags["tuneflow.trial"] == str(t["number"])
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(t["params"]["train.learning_rate"])
        assert run.data.params["train.lora.rank"] == str(t["params"]["train.lora.rank"])
        assert run.data.metrics["eval_loss"] == pytest.approx(t["value"])
    # every trial its own values: the resumed sampler, seeded anew, does not propose the first points again
    assert len({t["params"]["train.learning_rate"] for t in complete}) == TRIALS

    # --register: the best trial's export through retrain's gate, the first version of the name
    decision = result["decision"]
    assert (decision["decision"], decision["version"], decision["metric"]) == ("promoted", 1, "eval_loss"), decision
    version = client.get_model_version("searched", "1")
    assert client.get_run(version.run_id).data.tags["mlflow.parentRunId"] == best["mlflow_run_id"]


@pytest.fixture(scope="module")
def team(prefect_api, hub_mirror, tmp_path_factory) -> Iterator[Team]:
    """The team servers with `make deploy GPU_CONCURRENCY=2`: two trials train at once on two gpu machines."""
    with start_team(prefect_api, hub_mirror, tmp_path_factory, gpu_concurrency=2) as team:
        yield team


def test_a_sweep_on_the_team_servers_prunes_resumes_and_gates_its_best(team):
    """`tuneflow sweep --submit --wait --register` from the client machine: the sweep is a flow run of
    tuneflow-sweep/on-demand on the cpu pool, its trials' training flow runs of tuneflow-train/gpu, two at a time.
    The first sweep (2 trials) registers its best as the champion; run again with --trials 4, the same study
    resumes and runs only the two missing trials: one is pruned while it trains (a learning rate too small to learn,
    behind the median of the first two), the other's export is registered and decided against the champion."""
    from mlflow import MlflowClient

    config = tiny_config(team, "team-sweep", eval_steps=2)
    config["registry"] = {"model_name": "team-searched", "eval_samples": 8}
    # the grid's order under seed 5: 1e-3 and 2e-3 first, then 5e-3 and the hopeless 1e-7
    config["sweep"] = {"space": {"train.learning_rate": [1e-3, 2e-3, 5e-3, 1e-7]}, "sampler": "grid", "seed": 5,
                       "pruner": "median", "parallel": 2, "trials": 2}
    client = team.folder("client")
    (client / "sweep.yaml").write_text(yaml.safe_dump(config))
    command = [str(Path(sys.executable).parent / "tuneflow"), "sweep", "--config", "sweep.yaml", "--submit", "--wait",
               "--register"]
    logs = lambda: "\n".join(f"--- {m} ---\n" + worker_log(team, m, pool)  # noqa: E731
                             for m, pool in (("cpu", "cpu"), ("gpu-1", "gpu"), ("gpu-2", "gpu")))
    with worker(team, "cpu", "cpu"), worker(team, "gpu", "gpu-1"), worker(team, "gpu", "gpu-2"):
        first = subprocess.run(command, cwd=client, env=machine_env(team, "client"), capture_output=True, text=True,
                               timeout=900)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + logs()
        again = subprocess.run([*command, "--trials", "4"], cwd=client, env=machine_env(team, "client"),
                               capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:] + logs()
        text = logs()
    one, two = (json.loads(done.stdout.strip().splitlines()[-1]) for done in (first, again))
    assert "submitted flow run" in first.stdout and "tuneflow-sweep/on-demand (pool cpu, training on " \
        "tuneflow-train/gpu)" in first.stdout, first.stdout
    assert [t["state"] for t in one["trials"]] == ["complete", "complete"], (one["trials"], text)
    assert (one["decision"]["decision"], one["decision"]["version"]) == ("promoted", 1), one["decision"]

    # resumed: the first two trials as they were, then only the two missing ones
    assert two["sweep"] == one["sweep"] and two["trials"][:2] == one["trials"], two["trials"]
    states = {t["params"]["train.learning_rate"]: t["state"] for t in two["trials"][2:]}
    assert states == {5e-3: "complete", 1e-7: "pruned"}, two["trials"]
    pruned = next(t for t in two["trials"] if t["state"] == "pruned")
    # --wait's progress: each trial as it ends, and the best so far
    assert f"trial {pruned['number']}: pruned" in again.stdout and "best so far: trial" in again.stdout, again.stdout
    best = min((t for t in two["trials"] if t["state"] == "complete"), key=lambda t: t["value"])
    assert two["best_trial"] == best["number"] and two["best_value"] == best["value"], two
    decision = two["decision"]  # the best of four, through the gate against the first sweep's champion
    if best["number"] < 2:
        assert decision["decision"] == "skipped" and decision["version"] == 1, decision
    else:
        assert decision["decision"] in ("promoted", "kept") and decision["version"] == 2, decision
        assert set(decision["scores"]) == {"challenger", "champion", "base"}, decision

    mlflow = MlflowClient(team.mlflow)
    sweep = mlflow.get_run(two["sweep"])
    assert sweep.info.status == "FINISHED" and sweep.data.metrics["trials.pruned"] == 1, sweep.data.metrics
    assert sweep.data.metrics["pruning.saved_gpu_seconds"] > 0 and sweep.data.tags["tuneflow.best_run"] == \
        best["mlflow_run_id"]
    assert {"optuna/optimization_history.png", "optuna/param_importances.png"} <= {
        f.path for f in mlflow.list_artifacts(two["sweep"], "optuna")}
    runs = {t["number"]: mlflow.get_run(t["mlflow_run_id"]) for t in two["trials"]}
    for t in two["trials"]:
        run = runs[t["number"]]
        assert run.data.tags["mlflow.parentRunId"] == two["sweep"] == run.data.tags["tuneflow.sweep"]
        assert run.data.tags["tuneflow.trial.state"] == t["state"]
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(t["params"]["train.learning_rate"])
    summary = json.loads(Path(mlflow.download_artifacts(pruned["mlflow_run_id"], "summary.json",
                                                        str(client))).read_text())
    train = summary["stages"]["train"]
    assert summary["status"] == "stopped" and train["stopped"].startswith("pruned by the sweep at step"), summary
    assert 2 <= train["global_step"] < 12 and mlflow.list_artifacts(train["mlflow_run_id"], "adapter"), train
    # two at a time: the resumed sweep's two trials trained at once (each gpu worker takes one run at a time)
    trains = [mlflow.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{runs[n].info.run_id}' "
                                 "and tags.mlflow.runName = 'train'")[0].info for n in (2, 3)]
    assert trains[0].start_time < trains[1].end_time and trains[1].start_time < trains[0].end_time, trains
