"""`tuneflow sweep` end to end on the tiny model: trials of the pipeline proposed by Optuna, each nested under the
sweep's MLflow run with its values as params; killed after two finished trials and started again, the sweep resumes
the study, runs a trial cut off midway again and only the trials still missing, and with --register puts the best
trial's export through the gate of `tuneflow retrain`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

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


def test_a_hopeless_trial_is_pruned_while_it_trains(tmp_path, tiny_assets, prefect_api):
    """sweep.pruner median: the held-out loss every train.eval_steps goes to Optuna; the third trial (a learning rate
    too small to learn anything, last in the seeded grid) falls behind the median of the first two and its training
    stops at an evaluation, its weights kept; the sweep records it as pruned and what it saved, and goes on."""
    from mlflow import MlflowClient

    lrs = [1e-2, 5e-3, 1e-7]  # the grid's order under seed 5: the hopeless one last
    command, env = sweep_command(
        tmp_path, tiny_assets, prefect_api, space={"train.learning_rate": lrs},
        train={"method": "lora", "max_steps": 12, "eval_steps": 2, "per_device_batch_size": 8, "deepspeed": "none",
               "nproc_per_node": 1, "save_steps": 100, "retries": 0, "precision": "fp32"},
        export={"enabled": False}, sweep={"sampler": "grid", "seed": 5, "trials": 3, "pruner": "median"})
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    states = {t["params"]["train.learning_rate"]: t["state"] for t in result["trials"]}
    assert states == {1e-2: "complete", 5e-3: "complete", 1e-7: "pruned"}, result["trials"]
    pruned = next(t for t in result["trials"] if t["state"] == "pruned")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    summary = json.loads(Path(client.download_artifacts(pruned["mlflow_run_id"], "summary.json")).read_text())
    train = summary["stages"]["train"]
    assert summary["status"] == "stopped" and train["stopped"].startswith("pruned by the sweep at step"), summary
    assert 2 <= train["global_step"] < 12 and summary["stages"]["evaluate"]["status"] == "skipped", summary
    assert client.list_artifacts(train["mlflow_run_id"], "adapter"), "the pruned trial's weights were not kept"
    sweep = client.get_run(result["sweep"]).data.metrics
    assert sweep["trials.pruned"] == 1 and sweep["pruning.saved_gpu_seconds"] > 0, sweep
