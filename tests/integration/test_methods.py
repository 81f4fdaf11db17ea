"""Every fine-tuning method end to end through `tuneflow run`, as qlora runs in test_pipeline_e2e.py: qlora over 8-bit
weights, lora (16-bit base + adapter), full (every weight, with bitsandbytes' 8-bit AdamW) and freeze (only the top
layers). Each trains, lowers the held-out loss, and exports a model that answers as the trained weights did; freeze
leaves the lower layers exactly as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.pairs import write_pairs
from tests.support.servers import add_repo

pytestmark = pytest.mark.slow


def run(tmp_path: Path, tiny_assets, prefect_api: str, method: str, extra: dict | None = None, lower_loss=True,
        export_dtype: str = "bf16", hub=None, args: tuple[str, ...] = (), **train) -> dict:
    """`tuneflow run` (or `retrain`, given a registry section, with ``args``) of the tiny model and data in local
    folders, or of ``extra``'s model and dataset on the Hub mirror ``hub``; ``extra``'s sections replace the
    defaults'."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": method,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_assets["model"])},
        "dataset": {"name_or_path": str(tiny_assets["data"]), "eval_size": 16},
        "prep": {"cutoff_len": 128},
        "train": {"method": method, "max_steps": 20, "per_device_batch_size": 8, "gradient_accumulation_steps": 1,
                  "deepspeed": "none", "nproc_per_node": 1, "save_steps": 10, "retries": 0, **train},
        "eval": {"max_samples": 16, "max_new_tokens": 12, "batch_size": 16},
        "export": {"max_shard_size": "2MB", "dtype": export_dtype, "parity_samples": 8},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": method},
        **(extra or {}),
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "PREFECT_", "TUNEFLOW_"))}
    env.update(TUNEFLOW_CACHE=str(tmp_path / "cache"), PREFECT_API_URL=prefect_api,
               **({"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf-cache")} if hub else
                  {"HF_HUB_OFFLINE": "1"}))
    command = "retrain" if "registry" in (extra or {}) else "run"  # retrain: the decision is stdout's last line
    done = subprocess.run([str(Path(sys.executable).parent / "tuneflow"), command, "--config", str(config), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    last = done.stdout.strip().splitlines()[-1]
    if command == "retrain":
        [path] = (tmp_path / "runs").glob("*/summary.json")
        summary = {**json.loads(path.read_text()), "decision": json.loads(last)}
    else:
        summary = json.loads(Path(last).read_text())
    assert summary["status"] == "completed" and summary["stages"]["train"]["global_step"] == 20
    metrics = summary["metrics"]
    assert not lower_loss or metrics["eval_loss"] < metrics["base"]["eval_loss"], metrics
    assert metrics["export_parity"] == 1.0, metrics
    return summary


def layer_weights(folder: Path, layer: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items() if f"layers.{layer}." in k}


def train_params(tmp_path: Path, summary: dict) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client.get_run(summary["stages"]["train"]["mlflow_run_id"]).data.params


def test_lora(tmp_path, tiny_assets, prefect_api):
    # micro-batches sized by a token budget rather than a row count; PiSSA's initialisation, LoRA+ and NEFTune;
    # an evaluation dataset of its own, in another format
    rows = json.loads(Path(tiny_assets["data"]).read_text())[:12]
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in rows))
    summary = run(tmp_path, tiny_assets, prefect_api, "lora", extra={"eval_dataset": {
        "name_or_path": str(held_out), "format": "messages"}}, learning_rate=5e-3, tokens_per_batch=300,
                  neftune_noise_alpha=5, lora={"rank": 8, "alpha": 16, "dropout": 0.0, "init": "pissa",
                                               "loraplus_lr_ratio": 16})
    assert summary["stages"]["prepare"]["stats"]["eval_rows"] == 12
    assert summary["lineage"]["eval_dataset_revision"].startswith("sha256:")
    from mlflow import MlflowClient

    evaluate = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["stages"]["evaluate"]["mlflow_run_id"])
    assert [d.dataset.name for d in evaluate.inputs.dataset_inputs] == [f"{held_out}#eval"]
    assert summary["stages"]["train"]["weights"].endswith("/adapter")
    adapter = Path(summary["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16, config  # PiSSA converted to an adapter of the original base: rank 2r


def test_qlora_over_8_bit_weights(tmp_path, tiny_assets, prefect_api):
    """train.quantization.bits: 8 (LLM.int8), with rsLoRA: trains, and the export merges into the dequantised
    8-bit base with parity."""
    summary = run(tmp_path, tiny_assets, prefect_api, "qlora", learning_rate=5e-3, quantization={"bits": 8},
                  lora={"rank": 8, "alpha": 16, "dropout": 0.0, "use_rslora": True})
    assert summary["stages"]["train"]["weights"].endswith("/adapter")
    config = json.loads((Path(summary["adapter_dir"]) / "adapter_config.json").read_text())
    assert config["use_rslora"] is True


def test_full_with_an_8bit_optimizer(tmp_path, tiny_assets, prefect_api):
    """bitsandbytes' 8-bit AdamW steps on the CPU: its checkpointed states are bytes (LoRA's small matrices would
    keep 32-bit states: bitsandbytes quantises tensors of 4096 elements or more)."""
    import torch

    summary = run(tmp_path, tiny_assets, prefect_api, "full", learning_rate=1e-3, optimizer="adamw_8bit")
    assert summary["stages"]["train"]["weights"].endswith("/model")
    base, tuned = layer_weights(tiny_assets["model"], 0), layer_weights(Path(summary["export_dir"]), 0)
    assert all(not base[k].equal(tuned[k]) for k in base if k.endswith("proj.weight"))
    from mlflow import MlflowClient

    train_run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["stages"]["train"]["mlflow_run_id"])
    assert train_run.data.tags["tuneflow.optimizer_class"] == "bitsandbytes.AdamW", train_run.data.tags
    states = torch.load(next((tmp_path / "runs").rglob("checkpoint-20/optimizer.pt")), weights_only=False)["state"]
    big = [s.get("__bnb_optimizer_quant_state__", s)["state1"] for s in states.values()]
    big = [t.dtype for t in big if t.numel() >= 4096]  # the matrices; norms keep 32-bit states
    assert big.count(torch.uint8) == len(big) - 1 > 10, big  # all but the input embeddings, as the Trainer asks


def test_freeze(tmp_path, tiny_assets, prefect_api):
    # per_device_batch_size: auto on a CPU without train.gpu_memory: 4 rows, recorded in the train stage's MLflow run
    summary = run(tmp_path, tiny_assets, prefect_api, "freeze", learning_rate=1e-3, freeze_trainable_layers=1,
                  per_device_batch_size="auto")
    assert train_params(tmp_path, summary)["resolved.train.per_device_batch_size"] == "4"
    export = Path(summary["export_dir"])
    frozen, base = layer_weights(export, 0), layer_weights(tiny_assets["model"], 0)
    assert all(frozen[k].equal(base[k]) for k in base), "a frozen layer changed"
    trained, before = layer_weights(export, 1), layer_weights(tiny_assets["model"], 1)
    assert any(not trained[k].equal(before[k]) for k in before), "the top layer did not train"


def test_a_paged_optimizer_is_refused_on_a_machine_without_cuda(tmp_path, tiny_assets):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: paged optimizers run here")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_assets["model"])}, "output_dir": str(tmp_path),
                                      "dataset": {"name_or_path": str(tiny_assets["data"])},
                                      "train": {"optimizer": "paged_adamw_8bit"}}))
    done = subprocess.run([str(Path(sys.executable).parent / "tuneflow"), "run", "--config", str(config)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "train.optimizer: paged_adamw_8bit pages its states through CUDA memory" in done.stderr, done.stderr
    assert "use adamw_8bit here" in done.stderr and not list(tmp_path.glob("run-*")), "it started anyway"


def rising(client, run_id: str, key: str) -> list[float]:
    values = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
    assert len(values) == 20 and sum(values[-5:]) / 5 > values[0], (key, values)
    return values


def earlier_adapter(tiny_assets, folder: Path) -> Path:
    """A rank-4 adapter of the tiny model that already changes it (as an SFT stage's would): B is not zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(folder)
    return folder


def test_dpo_on_preference_pairs_through_retrain(tmp_path, tiny_assets, hub_mirror, prefect_api):
    """train.objective: dpo over qlora (TRL's DPOTrainer; 2 processes under ZeRO-2) of the model and a dataset of pairs
    in TRL's layout on the Hub mirror, starting from an earlier stage's adapter logged to MLflow (runs:/.../adapter,
    the reference its frozen copy), through `tuneflow retrain` gated on pref_accuracy: the reward accuracy on the
    training pairs rises above its start, TRL's metrics reach the train run, held-out preference accuracy is logged
    for tuned and base, the export merges the trained adapter (not TRL's reference copy) with parity, and the
    version is registered and promoted on the frozen pairs."""
    from mlflow import MlflowClient

    (tmp_path / "pairs").mkdir()
    pairs = write_pairs(tmp_path / "pairs" / "train.jsonl", tiny_assets["data"])
    dataset_sha = add_repo(hub_mirror.mirror, "dataset", "tiny-org/tiny-prefs", pairs.parent)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    first_stage = client.create_run(client.create_experiment("sft", str(tmp_path / "sft-artifacts"))).info.run_id
    client.log_artifacts(first_stage, str(earlier_adapter(tiny_assets, tmp_path / "sft-adapter")), "adapter")
    extra = {"model": {"name_or_path": hub_mirror.model_id},
             "dataset": {"name_or_path": "tiny-org/tiny-prefs", "format": "preference", "eval_size": 16},
             "registry": {"model_name": "dpo-assistant", "metric": "pref_accuracy", "eval_samples": 8}}
    summary = run(tmp_path, tiny_assets, prefect_api, "qlora", lower_loss=False, extra=extra, objective="dpo",
                  learning_rate=5e-3, preference={"beta": 0.1, "init_adapter": f"runs:/{first_stage}/adapter"},
                  nproc_per_node=2, deepspeed="zero2", per_device_batch_size=4,
                  # the tiny model's next-token logits lie closer together (0.004 apart) than bf16's rounding of the
                  # merged weights moves them (0.005): fp32 throughout, for an exact parity
                  precision="fp32", export_dtype="fp32", hub=hub_mirror)
    assert summary["lineage"]["dataset_revision"] == dataset_sha, summary["lineage"]
    train_run = summary["stages"]["train"]["mlflow_run_id"]
    rising(client, train_run, "rewards/accuracies")
    margins = client.get_metric_history(train_run, "rewards/margins")
    assert max(margins, key=lambda m: m.step).value > 0, margins
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(
        client.get_run(train_run).data.metrics)
    adapter = Path(summary["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4  # the earlier adapter, trained on
    # held-out pairs: the implicit reward against the base ranks chosen over rejected; the base against itself ties
    metrics = summary["metrics"]
    assert metrics["pref_accuracy"] > 0.5 and metrics["pref_margin"] > 0, metrics
    assert metrics["base"]["pref_accuracy"] == 0 and metrics["base"]["pref_margin"] == 0, metrics
    predictions = client.download_artifacts(summary["stages"]["evaluate"]["mlflow_run_id"],
                                            "predictions/predictions.jsonl", str(tmp_path))
    first = json.loads(Path(predictions).read_text().splitlines()[0])
    assert first["rejected"] and first["rejected"] != first["reference"]
    decision = summary["decision"]
    assert decision["decision"] == "promoted" and decision["metric"] == "pref_accuracy", decision
    assert decision["scores"]["challenger"] > decision["scores"]["base"] == 0, decision


def test_dpo_of_every_weight_against_a_frozen_copy(tmp_path, tiny_assets, prefect_api):
    """train.objective: dpo over full (2 processes under ZeRO-3): TRL loads a frozen copy of the starting model as the
    reference and shards it as it does the policy; the reward accuracy on the training pairs rises, held-out pairs
    rank chosen over rejected against the base, and the export, every weight trained, holds parity."""
    from mlflow import MlflowClient

    pairs = write_pairs(tmp_path / "pairs.jsonl", tiny_assets["data"])
    summary = run(tmp_path, tiny_assets, prefect_api, "full", lower_loss=False, extra={"dataset": {
        "name_or_path": str(pairs), "format": "preference", "eval_size": 16}}, objective="dpo", learning_rate=1e-3,
        nproc_per_node=2, deepspeed="zero3", per_device_batch_size=4, precision="fp32", export_dtype="fp32")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    rising(client, summary["stages"]["train"]["mlflow_run_id"], "rewards/accuracies")
    metrics = summary["metrics"]
    assert metrics["pref_accuracy"] > 0.5 and metrics["pref_margin"] > 0, metrics
    base, tuned = layer_weights(tiny_assets["model"], 0), layer_weights(Path(summary["export_dir"]), 0)
    assert all(not base[k].equal(tuned[k]) for k in base if k.endswith("proj.weight"))


def test_orpo_on_preference_pairs(tmp_path, tiny_assets, prefect_api):
    """train.objective: orpo (TRL's ORPOTrainer, no reference model) over qlora on the same pairs: the log odds of
    the chosen answer over the rejected one rise above zero on the training pairs, ORPO's own metrics reach the train
    run, held-out pairs get a positive reward margin, and the export holds parity."""
    from mlflow import MlflowClient

    pairs = write_pairs(tmp_path / "pairs.jsonl", tiny_assets["data"])
    summary = run(tmp_path, tiny_assets, prefect_api, "qlora", lower_loss=False, extra={"dataset": {
        "name_or_path": str(pairs), "format": "preference", "eval_size": 16}}, objective="orpo", learning_rate=5e-3,
        preference={"beta": 1.0}, lora={"rank": 8, "alpha": 16, "dropout": 0.0})
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    train_run = summary["stages"]["train"]["mlflow_run_id"]
    odds = rising(client, train_run, "log_odds_chosen")  # log odds of the chosen answer over the rejected one
    assert sum(odds[-5:]) / 5 > 0, odds
    assert {"log_odds_ratio", "nll_loss", "rewards/accuracies"} <= set(client.get_run(train_run).data.metrics)
    metrics = summary["metrics"]
    assert metrics["pref_margin"] > 0 and metrics["pref_accuracy"] > metrics["base"]["pref_accuracy"] == 0, metrics


def test_sft_then_dpo_from_the_sft_version_under_one_name(tmp_path, tiny_assets, prefect_api):
    """The two-stage recipe of README: `tuneflow retrain` of SFT registers version 1 of a name; `tuneflow retrain` of
    DPO from that registered model (model.name_or_path: models:/NAME/1, fetched from MLflow and pinned by its model
    id) on preference pairs, with the frozen set drawn anew from its held-out pairs, registers version 2 of the same
    name and promotes it over the SFT version on pref_accuracy; run again, it finds nothing changed."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    shared = {"tracking": {"uri": store, "experiment": "assistant"}}
    registry = {"model_name": "assistant", "eval_samples": 8}
    (tmp_path / "sft").mkdir()
    sft = run(tmp_path / "sft", tiny_assets, prefect_api, "lora", precision="fp32", export_dtype="fp32",
              extra={**shared, "registry": {**registry, "metric": "eval_loss"}})
    assert sft["decision"]["decision"] == "promoted" and sft["decision"]["version"] == 1, sft["decision"]
    sft_model = MlflowClient(store).get_model_version("assistant", "1").source.removeprefix("models:/")

    pairs = write_pairs(tmp_path / "pairs.jsonl", tiny_assets["data"])
    dpo_config = {**shared, "model": {"name_or_path": "models:/assistant/1"},
                  "dataset": {"name_or_path": str(pairs), "format": "preference", "eval_size": 16},
                  "registry": {**registry, "metric": "pref_accuracy"}}
    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    dpo = run(dpo_dir, tiny_assets, prefect_api, "lora", lower_loss=False, precision="fp32", export_dtype="fp32",
              extra=dpo_config, args=("--refreeze-eval-set",), objective="dpo", learning_rate=5e-3)
    assert dpo["lineage"]["model_revision"] == sft_model, dpo["lineage"]
    decision = dpo["decision"]
    assert decision["decision"] == "promoted" and (decision["version"], decision["champion"]) == (2, 2), decision
    # the SFT version is the base here: its implicit reward against itself is 0, the DPO version's above it
    assert decision["scores"]["challenger"] > decision["scores"]["champion"] == decision["scores"]["base"] == 0
    client = MlflowClient(store)
    download = client.get_run(dpo["stages"]["download"]["mlflow_run_id"]).data.params
    assert (download["model.source"], download["model.revision"]) == ("mlflow", sft_model), download
    assert client.get_model_version("assistant", "2").tags["tuneflow.model_sha"] == sft_model

    again = subprocess.run([str(Path(sys.executable).parent / "tuneflow"), "retrain", "--config",
                            str(dpo_dir / "config.yaml")], cwd=dpo_dir, capture_output=True, text=True, timeout=600,
                           env={**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))},
                                "PREFECT_API_URL": prefect_api, "TUNEFLOW_CACHE": str(dpo_dir / "cache")})
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["decision"] == "skipped", again.stdout[-2000:]
