"""A training rank killed with SIGKILL: the launch fails naming the dead rank, and the relaunch resumes from the
last complete checkpoint and ends where an uninterrupted run ends (supervised fine-tuning under ZeRO-2, DPO under
ZeRO-3). A checkpoint whose save was cut short is never picked up."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.support.pairs import write_pairs
from tests.support.servers import training_rank_pid
from tuneflow.core.config import TuneflowConfig
from tuneflow.data.prepare import build as prepare
from tuneflow.modeling.demo import build
from tuneflow.training.checkpoints import COMPLETE, last_complete_checkpoint
from tuneflow.training.launch.launcher import WorkerFailed, launch
from tuneflow.training.spec import TrainSpec

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 24, 4


# objective -> what differs: DPO (TRL's trainer, its reference adapter in every checkpoint) under ZeRO-3
OBJECTIVES = {"sft": {"deepspeed": "zero2"}, "dpo": {"deepspeed": "zero3", "objective": "dpo"}}


@pytest.fixture(scope="module", params=list(OBJECTIVES))
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"resume-{request.param}")
    assets = build(root / "assets", n_rows=120)
    data = assets["data"]
    if request.param == "dpo":
        data = write_pairs(root / "pairs.jsonl", data)
    cfg = TuneflowConfig.model_validate({
        "model": {"name_or_path": str(assets["model"])},
        "dataset": {"name_or_path": str(data), "eval_size": 8,
                    **({"format": "preference"} if request.param == "dpo" else {})},
        "prep": {"cutoff_len": 128},
        "train": {"method": "qlora", "max_steps": STEPS, "save_steps": SAVE_EVERY, "save_total_limit": 10,
                  "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3,
                  "lora": {"dropout": 0.0}, "nproc_per_node": 2, **OBJECTIVES[request.param]},
    })
    prepare(cfg, assets["model"], [data], root / "prepared")
    return root, cfg, assets


def _spec(root: Path, name: str, cfg, assets) -> Path:
    out = root / name
    out.mkdir()
    spec = out / "spec.json"
    spec.write_text(TrainSpec(config=cfg, model_dir=str(assets["model"]), data_dir=str(root / "prepared"),
                              output_dir=str(out)).model_dump_json())
    return spec


def _last_loss(out: Path) -> float:
    history = json.loads((out / "result.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h and h["step"] == STEPS][-1]


def test_killed_rank_resumes_from_last_complete_checkpoint(setup):
    root, cfg, assets = setup
    whole = _spec(root, "uninterrupted", cfg, assets)
    launch(whole, 2, 0, {}, on_line=lambda line: None)

    spec = _spec(root, "killed", cfg, assets)
    first_ckpt = spec.parent / "checkpoints" / f"checkpoint-{SAVE_EVERY}" / COMPLETE
    killed = {}

    def kill_rank_1_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and not first_ckpt.exists():
            time.sleep(0.02)
        pid = training_rank_pid(1, in_cmdline=str(spec))
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint)
    killer.start()
    with pytest.raises(WorkerFailed) as err:
        launch(spec, 2, 0, {}, on_line=lambda line: None)
    killer.join()
    assert killed, "rank 1 was never seen running"
    assert "rank 1: exit code -9 (SIGKILL)" in str(err.value)
    assert not (spec.parent / "result.json").exists()

    # What a kill in the middle of a later save leaves: a checkpoint folder with a truncated file and no marker.
    checkpoints = spec.parent / "checkpoints"
    complete = last_complete_checkpoint(checkpoints)
    assert complete is not None and int(complete.name.split("-")[1]) >= SAVE_EVERY
    half_written = checkpoints / f"checkpoint-{STEPS - 2}"
    shutil.copytree(complete, half_written)
    (half_written / COMPLETE).unlink()
    weights = half_written / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    lines = []
    launch(spec, 2, 0, {}, on_line=lines.append)
    result = json.loads((spec.parent / "result.json").read_text())
    assert result["resumed_from_step"] == int(complete.name.split("-")[1])
    assert f"discarding {half_written.name}: its save never finished" in "\n".join(lines)
    assert result["global_step"] == STEPS
    # Same data order, optimizer, scheduler and RNG state after resume: the last step's loss matches.
    assert _last_loss(spec.parent) == pytest.approx(_last_loss(whole.parent), abs=1e-3)


def test_killed_rank_in_a_pipeline_run_is_retried_and_recorded(tmp_path, hub_mirror, prefect_api, mlflow_server):
    """The same through `tuneflow run`: the train task's automatic retry resumes, and summary.json and MLflow say
    from which step and why."""
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": hub_mirror.model_id},
        "dataset": {"name_or_path": hub_mirror.dataset_id, "eval_size": 8},
        "prep": {"cutoff_len": 128},
        "train": {"max_steps": 12, "save_steps": SAVE_EVERY, "per_device_batch_size": 4,
                  "gradient_accumulation_steps": 1, "deepspeed": "zero2", "nproc_per_node": 2},  # retries: 1
        "eval": {"max_samples": 8, "max_new_tokens": 8, "batch_size": 8, "compare_base": False},
        "export": {"enabled": False},
        "tracking": {"uri": mlflow_server, "experiment": "resume"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_"))}
    env.update(HF_ENDPOINT=hub_mirror.endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), PREFECT_API_URL=prefect_api)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tuneflow"), "run", "--config", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = {}

    def kill_rank_1_after_first_checkpoint():
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            marks = list((tmp_path / "runs").glob(f"*/train/checkpoints/checkpoint-{SAVE_EVERY}/{COMPLETE}"))
            if marks:
                pid = training_rank_pid(1, in_cmdline=str(marks[0].parents[2] / "spec.json"))
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_rank_1_after_first_checkpoint)
    killer.start()
    out, err = proc.communicate(timeout=600)
    killer.join()
    assert killed, "rank 1 was never seen running"
    assert proc.returncode == 0, err[-6000:]
    summary = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    train = summary["stages"]["train"]
    assert train["status"] == "completed" and train["global_step"] == 12
    assert train["resumed_from_step"] is not None and train["resumed_from_step"] >= SAVE_EVERY
    tags = MlflowClient(mlflow_server).get_run(train["mlflow_run_id"]).data.tags
    assert tags["resumed_from_step"] == str(train["resumed_from_step"])
    assert "rank 1: exit code -9 (SIGKILL)" in tags["attempt_1_error"]
    assert "relaunching from the last complete checkpoint" in err
