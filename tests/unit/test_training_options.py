"""The training options of the config tree, as the memory plan counts them and as bitsandbytes really holds them:
train.optimizer (each optimizer's state; paged ones refused where there is no CUDA, optimizers DeepSpeed's CPU offload
cannot step refused in the config) and train.quantization (NF4 or FP4, double quantisation on or off, 8-bit)."""

import pytest

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.loading import ConfigError, load_config
from tuneflow.memory.estimate import plan
from tuneflow.memory.render import render
from tuneflow.modeling.precision import Machine, machine_problem

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def config(**train) -> TuneflowConfig:
    return TuneflowConfig.model_validate({"dataset": {"name_or_path": "x"}, "train": {"nproc_per_node": 1, **train}})


@pytest.mark.parametrize("optimizer, per_param", [
    ("adamw_torch_fused", 8), ("adamw_torch", 8),  # LoRA adapters train in fp32 without DeepSpeed: 2 x 4 bytes
    ("adamw_8bit", 2.03), ("paged_adamw_8bit", 2.03), ("paged_adamw_32bit", 8),
    ("lion_8bit", 1.02), ("lion_32bit", 4), ("adafactor", 0), ("sgd", 0),
])
def test_the_plan_counts_each_optimizers_state(optimizer, per_param):
    p = plan(config(optimizer=optimizer, deepspeed="none"), LLAMA_7B, world_size=1)
    trainable = p.params["trainable"]
    assert p.per_rank["optimizer"] == pytest.approx(trainable * per_param, abs=1)


def test_under_deepspeed_the_optimizer_steps_fp32_copies():
    adamw = plan(config(deepspeed="zero2", precision="bf16"), LLAMA_7B, world_size=1)
    eight = plan(config(deepspeed="zero2", precision="bf16", optimizer="adamw_8bit"), LLAMA_7B, world_size=1)
    trainable = adamw.params["trainable"]
    assert adamw.per_rank["optimizer"] == trainable * (8 + 4)  # fp32 moments + fp32 master of 16-bit adapters
    assert eight.per_rank["optimizer"] == pytest.approx(trainable * (2.03 + 4), abs=1)
    table = render(eight, "llama-7b")
    assert "optimizer states (AdamW, 2 moments of 8 bits + fp32 master)" in table, table
    assert "(AdamW, 2 moments in fp32 + fp32 master)" in render(adamw, "llama-7b")


def test_paged_optimizers_need_cuda():
    cpu = Machine(gpu=None, cpu="AVX2")
    said = machine_problem(config(optimizer="paged_adamw_8bit"), cpu)
    assert said == ("train.optimizer: paged_adamw_8bit pages its states through CUDA memory, and CPU AVX2 (no native "
                    "bf16) has no CUDA GPU; use adamw_8bit here (the same states, unpaged)")
    assert machine_problem(config(optimizer="paged_adamw_8bit"), Machine(gpu="NVIDIA H100", gpu_bf16=True)) is None
    assert machine_problem(config(optimizer="adamw_8bit"), cpu) is None


def test_cpu_offload_takes_adamw_only():
    with pytest.raises(ConfigError, match="train.optimizer: lion_8bit cannot step states offloaded to the CPU by "
                                          "zero3_offload"):
        load_config(data={"dataset": {"name_or_path": "x"},
                          "train": {"method": "lora", "deepspeed": "zero3_offload", "optimizer": "lion_8bit"}})
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(data={"dataset": {"name_or_path": "x"}, "train": {"optimizer": "adam"}})


@pytest.mark.parametrize("quantization", [{"type": "fp4"}, {"double_quant": False},
                                          {"type": "fp4", "double_quant": False}, {"bits": 8},
                                          {"compute_dtype": "fp32"}],
                         ids=["fp4", "no-double-quant", "fp4-no-double-quant", "8-bit", "fp32-compute"])
def test_each_quantization_is_what_bitsandbytes_loads(tiny_assets, tmp_path, quantization):
    """The plan's quantised weights against the bytes of the model loaded with those settings (a 512-wide Llama)."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.quantized import loaded_bytes
    from tuneflow.modeling.load import load_base

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=2, vocab_size=1024)).to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = TuneflowConfig.model_validate({"dataset": {"name_or_path": "x"}, "model": {"name_or_path": str(tmp_path)},
                                         "train": {"deepspeed": "zero0", "precision": "bf16", "nproc_per_node": 1,
                                                   "quantization": quantization}})
    real = loaded_bytes(load_base(tmp_path, cfg, quantized=True, device_map={"": "cpu"}))
    p = plan(cfg, json.loads((tmp_path / "config.json").read_text()), world_size=1)
    assert p.per_rank["quantized_weights"] == pytest.approx(real["quantized"], rel=0.01)
    assert p.per_rank["frozen_weights"] == pytest.approx(real["frozen"], rel=0.01)


def test_nf4_fp4_double_quant_and_8_bit_each_change_the_plan():
    plans = {name: plan(config(quantization=q), LLAMA_7B, world_size=1) for name, q in (
        ("nf4", {}), ("fp4", {"type": "fp4"}), ("no-dq", {"double_quant": False}), ("8-bit", {"bits": 8}))}
    weights = {name: p.per_rank["quantized_weights"] for name, p in plans.items()}
    assert weights["fp4"] == weights["nf4"]  # the same layout
    assert weights["no-dq"] - weights["nf4"] == pytest.approx(plans["nf4"].params["quantized"] * 0.37 / 8, rel=0.05)
    assert weights["8-bit"] == pytest.approx(2 * weights["nf4"], rel=0.1)
    tables = {name: render(p, "llama-7b") for name, p in plans.items()}
    assert "4-bit NF4 weights (+ double-quant constants)" in tables["nf4"]
    assert "4-bit FP4 weights (+ double-quant constants)" in tables["fp4"]
    assert "4-bit NF4 weights (+ fp32 block scales)" in tables["no-dq"]
    assert "8-bit weights (+ a scale per row)" in tables["8-bit"]


def test_8_bit_weights_cannot_be_sharded_by_zero3():
    with pytest.raises(ConfigError, match=r"train.quantization.bits: ZeRO-3 \(zero3\) cannot shard 8-bit weights"):
        load_config(data={"dataset": {"name_or_path": "x"},
                          "train": {"deepspeed": "zero3", "quantization": {"bits": 8}}})
    ignored = config(method="lora", quantization={"bits": 8}).ignored_settings()
    assert ignored == ["train.quantization applies to method qlora, not lora: ignored"]


VARIANTS = {  # train.lora settings -> the method they train with
    "dora": ("lora", {"use_dora": True}), "qdora": ("qlora", {"use_dora": True}),
    "rslora": ("qlora", {"use_rslora": True}), "gaussian": ("qlora", {"init": "gaussian"}),
    "pissa": ("lora", {"init": "pissa"}), "olora": ("lora", {"init": "olora"}),
    "modules_to_save": ("lora", {"modules_to_save": ["lm_head"]}),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANTS)
def test_export_merges_each_lora_variant_exactly(tiny_assets, tmp_path, variant):
    """The worker's model for each variant, a few optimizer steps, the adapter saved as the worker saves it; then the
    export's merge (dequantised base + adapter, merged) against evaluate's base + adapter: the same greedy answers."""
    import torch

    from tuneflow.modeling.generation import generate
    from tuneflow.modeling.load import load_merged, load_tokenizer, load_trained
    from tuneflow.training.worker import build_model

    method, lora = VARIANTS[variant]
    cfg = TuneflowConfig.model_validate({
        "dataset": {"name_or_path": "x"}, "model": {"name_or_path": str(tiny_assets["model"])},
        "train": {"method": method, "precision": "fp32", "deepspeed": "none", "nproc_per_node": 1,
                  "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, **lora}}})
    torch.manual_seed(0)
    model = build_model(cfg, str(tiny_assets["model"]), tmp_path / "adapter-init")
    tokenizer = load_tokenizer(tiny_assets["model"], cfg)
    ids = tokenizer(["Add 1 and 2. 1 plus 2 is 3.", "Reverse: a b c. c b a"], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(4):
        model(**ids, labels=ids["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if lora.get("init") in ("pissa", "olora"):
        model.save_pretrained(tmp_path / "adapter",
                              path_initial_model_for_weight_conversion=str(tmp_path / "adapter-init"))
    else:
        model.save_pretrained(tmp_path / "adapter")
    prompts = [[{"role": "user", "content": q}] for q in ("Add 4 and 5.", "Reverse the words: red blue", "Title: x")]
    device = {"": "cpu"}
    tuned = generate(load_trained(tiny_assets["model"], tmp_path / "adapter", cfg, device), tokenizer, prompts, 12)
    merged = load_merged(tiny_assets["model"], tmp_path / "adapter", cfg, torch.float32, device)
    assert generate(merged, tokenizer, prompts, 12) == tuned


@pytest.mark.parametrize("train, said", [
    ({"lora": {"init": "pissa"}}, "train.lora.init: pissa rewrites the base weights, which qlora keeps quantised; use "
                                  "method lora"),
    ({"method": "lora", "deepspeed": "zero3", "lora": {"init": "olora"}},
     "train.lora.init: olora needs each base weight whole, which ZeRO-3 shards; use zero2"),
    ({"quantization": {"bits": 8}, "lora": {"use_dora": True}},
     "train.lora.use_dora: peft's DoRA fails over 8-bit weights"),
])
def test_lora_variants_that_cannot_work_are_refused(train, said):
    with pytest.raises(ConfigError) as info:
        load_config(data={"dataset": {"name_or_path": "x"}, "train": train})
    assert said in str(info.value), str(info.value)


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"modules_to_save": ["lm_head"]},
                                  {"use_dora": True, "modules_to_save": ["embed_tokens", "lm_head"],
                                   "target_modules": ["q_proj", "down_proj"]}], ids=["dora", "lm_head", "both"])
def test_the_plan_counts_what_peft_trains(tiny_assets, lora):
    import json

    from tuneflow.training.worker import build_model

    cfg = TuneflowConfig.model_validate({
        "dataset": {"name_or_path": "x"}, "model": {"name_or_path": str(tiny_assets["model"])},
        "train": {"method": "lora", "precision": "fp32", "deepspeed": "none", "nproc_per_node": 1,
                  "lora": {"rank": 4, **lora}}})
    model = build_model(cfg, str(tiny_assets["model"]))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p = plan(cfg, json.loads((tiny_assets["model"] / "config.json").read_text()), world_size=1)
    assert p.params["trainable"] == trained


def test_attention_kernels_by_machine():
    from tuneflow.modeling.precision import attention

    def cfg(attn: str) -> TuneflowConfig:
        return TuneflowConfig.model_validate({"dataset": {"name_or_path": "x"}, "model": {"attn_implementation": attn}})

    cpu, gpu = Machine(gpu=None, cpu="AVX512"), Machine(gpu="NVIDIA H100", gpu_bf16=True)
    flash = Machine(gpu="NVIDIA H100", gpu_bf16=True, flash_attn=True)
    assert [attention(cfg("auto"), m) for m in (cpu, gpu, flash)] == ["sdpa", "sdpa", "flash_attention_2"]
    assert attention(cfg("eager"), cpu) == "eager" and attention(cfg("flash_attention_2"), cpu) == "sdpa"  # evaluate
    assert machine_problem(cfg("flash_attention_2"), gpu) == (
        "model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn), which "
        "GPU NVIDIA H100 (with bf16) lacks; use auto or sdpa")
    assert "flash_attention_2 needs a CUDA GPU" in machine_problem(cfg("flash_attention_2"), cpu)
    assert machine_problem(cfg("flash_attention_2"), flash) is None
    assert "flex_attention does not train on CPU AVX512" in machine_problem(cfg("flex_attention"), cpu)
    assert machine_problem(cfg("flex_attention"), gpu) is None and machine_problem(cfg("auto"), cpu) is None


# --- an adapter to start from (train.preference.init_adapter) ------------------------------------------------------


def test_an_adapter_to_start_from_must_fit_the_base(tiny_assets, tmp_path):
    """An adapter trained on this model fits; one whose matrices were sized for another model is named with the
    layer and what differs; a folder without adapter weights says so."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tuneflow.sources.adapters import fit_problems

    config = json.loads((tiny_assets["model"] / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "fits")
    assert fit_problems(tmp_path / "fits", config, "train.preference.init_adapter") == []

    other = tmp_path / "other"
    other.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 999)},
              other / "adapter_model.safetensors")
    [problem] = fit_problems(other, config, "train.preference.init_adapter")
    assert problem == (f"train.preference.init_adapter: {other} was trained on another model: its layer 0 q_proj "
                       f"adapter takes 999 features, this model's q_proj takes {config['hidden_size']}")
    [problem] = fit_problems(tmp_path, config, "train.preference.init_adapter")
    assert "holds no adapter_model.safetensors" in problem
