"""`tuneflow plan`: the memory plan per rank, from config.json alone.

The static lines are held against the bytes of real tensors: tiny Llama/Qwen2 models loaded on the CPU with
bitsandbytes NF4 + double quantisation exactly as training loads them (tuneflow.modeling.load.load_base), and the LoRA
parameter count against peft's own get_peft_model. The QLoRA paper's claims (arXiv 2305.14314) are checked on
config dicts of LLaMA 7B/33B/65B (nothing is downloaded). Activations are an estimate; see docs/memory.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.quantized import loaded_bytes
from tuneflow.cli.main import main
from tuneflow.core.config import TuneflowConfig, parse_size
from tuneflow.memory.auto import largest_batch_that_fits, plan_problems
from tuneflow.memory.estimate import plan, zero_setup
from tuneflow.memory.render import render
from tuneflow.memory.shape import GiB, ModelShape, lora_param_count, nf4_bytes

ROOT = Path(__file__).resolve().parents[2]


def config(**train) -> TuneflowConfig:
    prep = {"cutoff_len": train.pop("cutoff_len")} if "cutoff_len" in train else {}
    model = train.pop("model", "Qwen/Qwen2.5-0.5B-Instruct")
    train.setdefault("nproc_per_node", 1)
    return TuneflowConfig.model_validate({"dataset": {"name_or_path": "x"}, "model": {"name_or_path": str(model)},
                                          "prep": prep, "train": train})


def llama(hidden, intermediate, layers, heads, vocab=32000, **extra) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "vocab_size": vocab,
            "tie_word_embeddings": False, **extra}


LLAMA_7B = llama(4096, 11008, 32, 32)
LLAMA_33B = llama(6656, 17920, 60, 52)
LLAMA_65B = llama(8192, 22016, 80, 64)


# --- the static parts against real tensors -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """The tiny demo Llama, plus a bigger random Llama (GQA, tied embeddings) and a Qwen2 (q/k/v biases)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = {"tiny-llama": tiny_assets["model"]}
    common = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, dtype="bfloat16")
    for name, cls, conf in (("llama-512", LlamaForCausalLM, LlamaConfig(**common, tie_word_embeddings=True)),
                            ("qwen2-256", Qwen2ForCausalLM, Qwen2Config(**{**common, "hidden_size": 256,
                                                                           "num_hidden_layers": 2,
                                                                           "intermediate_size": 512,
                                                                           "tie_word_embeddings": False}))):
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        cls(conf).to(torch.bfloat16).save_pretrained(folder)
        out[name] = folder
    return out


@pytest.mark.parametrize(("name", "precision"), [("tiny-llama", "bf16"), ("llama-512", "bf16"), ("qwen2-256", "bf16"),
                                               ("llama-512", "fp32")])
def test_static_lines_equal_the_bytes_of_the_loaded_nf4_model(models, name, precision):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from tuneflow.modeling.load import load_base

    folder = models[name]
    model_config = json.loads((folder / "config.json").read_text())
    # ZeRO-0 (DeepSpeed, one rank): the weights as loaded, the non-4-bit parts in the compute dtype, nothing sharded.
    cfg = config(model=folder, deepspeed="zero0", precision=precision)
    model = load_base(folder, cfg, quantized=True, device_map={"": "cpu"})
    real = loaded_bytes(model)
    p = plan(cfg, model_config, world_size=1)
    assert p.per_rank["quantized_weights"] == pytest.approx(real["quantized"], rel=0.02)
    assert p.per_rank["frozen_weights"] == pytest.approx(real["frozen"], rel=0.02)
    total = p.per_rank["quantized_weights"] + p.per_rank["frozen_weights"]
    assert total == pytest.approx(real["quantized"] + real["frozen"], rel=0.02)
    unquantized = load_base(folder, cfg, quantized=False, device_map={"": "cpu"})
    assert p.params["total"] == sum(x.numel() for x in unquantized.parameters())

    # Without DeepSpeed too: the worker does not upcast the 16-bit parts to fp32 (no prepare_model_for_kbit_training)
    cfg = config(model=folder, deepspeed="none", precision=precision)
    p = plan(cfg, model_config, world_size=1)
    assert p.per_rank["frozen_weights"] == pytest.approx(real["frozen"], rel=0.02)

    # LoRA: the exact parameter count, and peft's fp32 adapters (params + grads in fp32 without DeepSpeed).
    for rank, targets in ((16, "all-linear"), (8, ["q_proj", "v_proj"]), (4, ["self_attn.o_proj", "down_proj"])):
        peft_model = get_peft_model(model, PeftLoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = [x for x in peft_model.parameters() if x.requires_grad]
        shape = ModelShape.from_config(model_config)
        assert lora_param_count(shape, rank, targets) == sum(x.numel() for x in trainable), (rank, targets)
        cfg = config(model=folder, deepspeed="none", lora={"rank": rank, "target_modules": targets},
                     precision=precision)
        adapter = plan(cfg, model_config, world_size=1).per_rank["adapter"]
        assert adapter == 2 * sum(x.numel() * x.element_size() for x in trainable)
        peft_model.unload()


def test_nf4_bytes_per_tensor():
    # 4096 x 4096: 8 MiB packed, 262144 absmax bytes, 1024 nested fp32 absmax, the two codes and the offset
    assert nf4_bytes(4096 * 4096) == 2**23 + 2**18 + 4 * 1024 + 4 + 64 + 1024
    # the paper's ~0.127 bits per parameter of constants (8/64 + 32/(64*256))
    n = 4096 * 11008
    assert (nf4_bytes(n) - n // 2) * 8 / n == pytest.approx(8 / 64 + 32 / (64 * 256), rel=0.01)


# --- the QLoRA paper ---------------------------------------------------------------------------------------------


def test_7b_in_4_bit_is_about_5_gb():
    cfg = config(deepspeed="zero0")
    p = plan(cfg, LLAMA_7B, world_size=1)
    assert p.params["total"] == pytest.approx(6.74e9, rel=0.01)
    base = p.per_rank["quantized_weights"] + p.per_rank["frozen_weights"]
    assert 3.5e9 <= base <= 5.5e9, base / 1e9
    assert 3.5e9 <= base + p.per_rank["frozen_weights"] <= 5.5e9  # even were the 16-bit parts upcast to fp32


@pytest.mark.parametrize("deepspeed", ["none", "zero2"])
def test_33b_trains_on_one_24gb_gpu(deepspeed):
    cfg = config(per_device_batch_size=1, cutoff_len=512, gradient_checkpointing=True, deepspeed=deepspeed)
    p = plan(cfg, LLAMA_33B, parse_size("24GiB"), world_size=1)
    assert p.fits is True, p.per_rank["total"] / GiB
    assert plan_problems(cfg, LLAMA_33B, parse_size("24GiB"), world_size=1) == []


def test_65b_fits_48gb_and_not_24gb():
    cfg = config(per_device_batch_size=1, cutoff_len=512, gradient_checkpointing=True, deepspeed="none")
    assert plan(cfg, LLAMA_65B, parse_size("48GiB"), world_size=1).fits is True
    assert plan(cfg, LLAMA_65B, parse_size("24GiB"), world_size=1).fits is False
    problems = plan_problems(cfg, LLAMA_65B, parse_size("24GiB"), world_size=1)
    assert len(problems) == 1 and problems[0].startswith("model.name_or_path: ")
    assert "train.deepspeed: zero3" in problems[0] and "on a 24 GiB GPU" in problems[0]
    assert largest_batch_that_fits(cfg, LLAMA_65B, parse_size("24GiB"), world_size=1) is None


# --- ZeRO, methods, activations ----------------------------------------------------------------------------------


def test_zero_stages_shard_what_they_say():
    shape_cfg = LLAMA_7B
    plans = {ds: plan(config(method="lora", deepspeed=ds), shape_cfg, world_size=4).per_rank
             for ds in ("zero0", "zero1", "zero2", "zero3")}
    one = plan(config(method="lora", deepspeed="zero0"), shape_cfg, world_size=1).per_rank
    assert plans["zero0"] == one  # nothing sharded
    assert plans["zero1"]["optimizer"] == -(-one["optimizer"] // 4)
    assert plans["zero1"]["adapter"] == one["adapter"]
    assert plans["zero2"]["adapter"] < one["adapter"] and plans["zero2"]["frozen_weights"] == one["frozen_weights"]
    # ZeRO-3: a quarter of the frozen weights plus the largest piece gathered at once (a decoder layer here)
    shape = ModelShape.from_config(shape_cfg)
    layer = shape.layer_linear_params() + shape.layer_small_params()
    assert layer > shape.embed_params
    assert plans["zero3"]["frozen_weights"] == pytest.approx(one["frozen_weights"] / 4 + 2 * layer, rel=1e-6)
    offload = plan(config(method="lora", deepspeed="zero3_offload"), shape_cfg, world_size=4).per_rank
    assert offload["optimizer"] == 0 and offload["frozen_weights"] < plans["zero3"]["frozen_weights"]
    # qlora under ZeRO-3: the packed 4-bit weights are sharded, the quantisation constants are not
    q1 = plan(config(deepspeed="zero3"), shape_cfg, world_size=1).per_rank["quantized_weights"]
    q4 = plan(config(deepspeed="zero3"), shape_cfg, world_size=4).per_rank["quantized_weights"]
    assert q1 / 4 < q4 < q1 / 3


def test_a_deepspeed_json_is_read(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    setup = zero_setup(str(path))
    assert (setup.deepspeed, setup.stage, setup.offload_optimizer, setup.offload_params) == (True, 3, True, False)


def test_methods_full_and_freeze():
    full = plan(config(method="full", deepspeed="zero0"), LLAMA_7B, world_size=1)
    n = full.params["total"]
    assert full.per_rank["frozen_weights"] == 0 and full.per_rank["quantized_weights"] == 0
    assert full.per_rank["adapter"] == 4 * n  # bf16 weights + bf16 grads
    assert full.per_rank["optimizer"] == 12 * n  # fp32 moments + fp32 master (mixed precision, ZeRO paper's K=12)
    freeze = plan(config(method="freeze", freeze_trainable_layers=2, deepspeed="zero0"), LLAMA_7B, world_size=1)
    shape = ModelShape.from_config(LLAMA_7B)
    per_layer = shape.layer_linear_params() + shape.layer_small_params()
    assert freeze.params["trainable"] == 2 * per_layer
    assert freeze.per_rank["frozen_weights"] == 2 * (n - 2 * per_layer)
    lora = plan(config(method="lora", deepspeed="zero0"), LLAMA_7B, world_size=1)
    assert lora.per_rank["frozen_weights"] == 2 * n


def test_activations_scale_and_checkpointing_saves():
    base = dict(cutoff_len=1024, deepspeed="zero2")
    on = plan(config(per_device_batch_size=1, packing=False, **base), LLAMA_7B, world_size=1).per_rank
    on4 = plan(config(per_device_batch_size=4, packing=False, **base), LLAMA_7B, world_size=1).per_rank
    off = plan(config(per_device_batch_size=1, gradient_checkpointing=False, packing=False, **base), LLAMA_7B,
               world_size=1).per_rank
    # the chunked loss: the labelled hidden states (<= every token, bf16) + one 256-token chunk of logits
    assert on["logits"] == 1024 * 4096 * 2 + 256 * 32000 * (2 + 12)
    assert on4["logits"] - on["logits"] == 3 * 1024 * 4096 * 2
    full = plan(config(per_device_batch_size=4, packing=False, loss_chunk_tokens=0, **base), LLAMA_7B,
                world_size=1).per_rank
    assert full["logits"] == 4 * 1024 * 32000 * 4 > 3 * on4["logits"]
    assert 3.5 * on["activations"] < on4["activations"] < 4 * on["activations"]  # linear, plus a fixed dequant buffer
    assert off["activations"] > 8 * on["activations"]
    # without checkpointing, a 7B layer keeps ~ (16h + 10h + 8I) bytes/token + LoRA inputs (no dropout: 16-bit)
    assert off["activations"] / (1024 * 32) == pytest.approx(16 * 4096 + 10 * 4096 + 8 * 11008 + 3 * (6 * 4096 + 11008)
                                                             + 7 * 2 * 16, rel=0.05)


def test_shapes_from_qwen_and_mistral_configs():
    qwen = ModelShape.from_config({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                                   "vocab_size": 151936, "tie_word_embeddings": True})
    assert qwen.linears()["k_proj"] == (896, 128) and qwen.lm_head_params == 0
    assert qwen.total_params() == pytest.approx(494e6, rel=0.01)  # Qwen2.5-0.5B
    mistral = ModelShape.from_config({"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                      "vocab_size": 32000, "head_dim": None})
    assert mistral.total_params() == pytest.approx(7.24e9, rel=0.01)  # Mistral-7B
    from tuneflow.memory.shape import PlanError

    with pytest.raises(PlanError, match="mixture of experts"):
        ModelShape.from_config({**LLAMA_7B, "num_local_experts": 8})


# --- refusing what cannot fit, the largest batch -----------------------------------------------------------------


def test_too_big_a_batch_names_what_fits():
    cfg = config(per_device_batch_size=64, cutoff_len=2048, deepspeed="zero2", gradient_accumulation_steps=2)
    gpu = parse_size("24GiB")
    best = largest_batch_that_fits(cfg, LLAMA_7B, gpu, world_size=1)
    assert best is not None and 1 <= best < 64
    fits = lambda n: plan(config(per_device_batch_size=n, cutoff_len=2048, deepspeed="zero2"),  # noqa: E731
                          LLAMA_7B, gpu, world_size=1).fits
    assert fits(best) and not fits(best + 1)
    [problem] = plan_problems(cfg, LLAMA_7B, gpu, world_size=1)
    assert problem.startswith("train.per_device_batch_size: 64 needs ~")
    assert f"GiB per rank on a 24 GiB GPU; {best} fits" in problem
    assert f"train.gradient_accumulation_steps: {-(-128 // best)}" in problem
    # checkpointing off: the message offers it when it would make the batch fit
    cfg = config(per_device_batch_size=8, cutoff_len=256, gradient_checkpointing=False, deepspeed="zero2")
    [problem] = plan_problems(cfg, LLAMA_7B, gpu, world_size=1)
    assert problem.startswith("train.per_device_batch_size: 8 needs") and problem.endswith(
        "or set train.gradient_checkpointing: true")
    cfg = config(per_device_batch_size=8, cutoff_len=2048, gradient_checkpointing=False, deepspeed="zero2")
    [problem] = plan_problems(cfg, LLAMA_7B, gpu, world_size=1)
    assert problem.startswith("train.gradient_checkpointing: false needs ~") and problem.endswith(
        "even at train.per_device_batch_size 1 (8 configured); set train.gradient_checkpointing: true")
    # a cutoff too long even at batch 1
    cfg = config(per_device_batch_size=1, cutoff_len=262144, deepspeed="zero2")
    [problem] = plan_problems(cfg, LLAMA_7B, gpu, world_size=1)
    assert problem.startswith("prep.cutoff_len: 262144 tokens need")
    assert plan_problems(cfg, LLAMA_7B, None, world_size=1) == []


def test_unknown_target_modules_are_reported():
    cfg = config(lora={"target_modules": ["W_pack"]})
    [problem] = plan_problems(cfg, LLAMA_7B, None, world_size=1)
    assert problem.startswith("train.lora.target_modules: W_pack match no module of a llama layer")


# --- the command -------------------------------------------------------------------------------------------------


def run_plan(argv: list[str]) -> int:
    return main(["plan", *argv])


def write_config(tmp_path: Path, model, **train) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(model)}, "dataset": {"name_or_path": "x"},
                                    "train": {"nproc_per_node": 1, **train}}))
    return path


def test_cli_json_is_one_line_of_bytes(tmp_path, tiny_assets, capsys):
    path = write_config(tmp_path, tiny_assets["model"])
    assert run_plan(["--config", str(path), "--gpu-memory", "24GB", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    assert data["gpu_memory"] == 24 * 10**9 and data["fits"] is True and data["per_device_batch_size"] == 4
    per_rank = data["per_rank"]
    assert {"quantized_weights", "frozen_weights", "adapter", "optimizer", "activations", "logits", "total"} <= set(
        per_rank)
    assert all(isinstance(v, int) for v in per_rank.values())
    assert per_rank["total"] == sum(v for k, v in per_rank.items() if k != "total")
    # --set works as in the other commands, and a plan that does not fit exits 1 naming the key
    code = run_plan(["--config", str(path), "--set", "train.per_device_batch_size=4096", "--set",
                     "prep.cutoff_len=4096", "--gpu-memory", "2GiB", "--json"])
    captured = capsys.readouterr()
    assert code == 1 and json.loads(captured.out)["fits"] is False
    assert "train.per_device_batch_size: 4096 needs" in captured.err


def test_cli_table(tmp_path, tiny_assets, capsys):
    path = write_config(tmp_path, tiny_assets["model"])
    assert run_plan(["--config", str(path), "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    for label in ("4-bit NF4 weights", "frozen weights", "LoRA params", "optimizer", "activations", "logits",
                  "margin", "total", "GPU memory 80.00 GiB: fits"):
        assert label in out, out
    with pytest.raises(SystemExit):
        run_plan(["--config", str(path), "--gpu-memory", "lots"])
    assert run_plan(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert run_plan(["--config", str(write_config(tmp_path, tmp_path / "no-model"))]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_config_json_comes_from_the_hub_alone(tmp_path, hub_mirror):
    """Only config.json is downloaded (HF_ENDPOINT is read at import: a new process)."""
    import os

    path = write_config(tmp_path, hub_mirror.model_id)
    cache = tmp_path / "hf-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_mirror.endpoint, HF_HUB_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-m", "tuneflow.cli.main", "plan", "--config", str(path), "--json"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["per_rank"]["quantized_weights"] > 0
    files = sorted(p.name for p in cache.rglob("*") if p.is_file() and "snapshots" in p.parts)
    assert files == ["config.json"]


def test_the_module_imports_fast():
    code = "import sys, tuneflow.cli.plan; sys.exit(any(m in sys.modules for m in ('torch', 'transformers')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_docs_explain_every_line():
    text = (ROOT / "docs/memory.md").read_text()
    for word in ("quantized_weights", "frozen_weights", "adapter", "optimizer", "activations", "logits", "margin",
                 "uncalibrated", "2305.14314", "gradient checkpointing", "ZeRO"):
        assert word in text, word


# --- 'auto' batch sizes and the token budget ---------------------------------------------------------------------


def test_auto_picks_the_largest_that_fits_and_says_so():
    from tuneflow.memory.auto import largest_tokens_that_fit, resolve_auto_batches

    gpu = parse_size("24GiB")
    cfg = config(per_device_batch_size="auto", tokens_per_batch="auto", cutoff_len=2048, deepspeed="zero2")
    resolved, notes = resolve_auto_batches(cfg, LLAMA_7B, gpu, world_size=1)
    batch, tokens = resolved.train.per_device_batch_size, resolved.train.tokens_per_batch
    assert batch == largest_batch_that_fits(config(cutoff_len=2048, deepspeed="zero2"), LLAMA_7B, gpu, world_size=1)
    assert tokens == largest_tokens_that_fit(cfg, LLAMA_7B, gpu, world_size=1) and tokens % 64 == 0
    fits = lambda **t: plan(config(cutoff_len=2048, deepspeed="zero2", **t), LLAMA_7B, gpu,  # noqa: E731
                            world_size=1).fits
    assert fits(per_device_batch_size=batch) and not fits(per_device_batch_size=batch + 1)
    assert fits(tokens_per_batch=tokens) and not fits(tokens_per_batch=tokens + 64)
    assert notes == [f"train.per_device_batch_size: auto -> {batch}: the largest that fits a 24 GiB GPU per the "
                     "memory plan", f"train.tokens_per_batch: auto -> {tokens}: the largest that fits a 24 GiB GPU "
                     "per the memory plan"]
    # train.gpu_memory is used when no GPU size is passed
    resolved, notes = resolve_auto_batches(config(per_device_batch_size="auto", cutoff_len=2048, deepspeed="zero2",
                                                  gpu_memory="24GiB"), LLAMA_7B, world_size=1)
    assert resolved.train.per_device_batch_size == batch and "train.gpu_memory 24GiB" in notes[0]


def test_auto_without_any_gpu_memory_says_what_it_picked(monkeypatch):
    import tuneflow.memory.auto as memory_auto

    monkeypatch.setattr(memory_auto, "visible_gpu_memory", lambda: None)  # this machine may have a GPU; CI has none
    cfg = config(per_device_batch_size="auto", tokens_per_batch="auto", cutoff_len=512)
    resolved, notes = memory_auto.resolve_auto_batches(cfg, LLAMA_7B, world_size=1)
    assert (resolved.train.per_device_batch_size, resolved.train.tokens_per_batch) == (4, 2048)
    assert notes[0].startswith("train.per_device_batch_size: auto -> 4: no GPU memory to size it by (no GPU visible "
                               "and train.gpu_memory unset")
    assert notes[1].startswith("train.tokens_per_batch: auto -> 2048: no GPU memory")


def test_a_token_budget_too_large_names_what_fits():
    gpu = parse_size("24GiB")
    cfg = config(tokens_per_batch=1 << 20, cutoff_len=2048, deepspeed="zero2")
    [problem] = plan_problems(cfg, LLAMA_7B, gpu, world_size=1)
    assert problem.startswith(f"train.tokens_per_batch: {1 << 20} needs ~")
    best = int(problem.split("; ")[1].split()[0])
    assert plan(config(tokens_per_batch=best, cutoff_len=2048, deepspeed="zero2"), LLAMA_7B, gpu, world_size=1).fits
    # the budget is the micro-batch: activations grow with it, not with per_device_batch_size
    small = plan(config(tokens_per_batch=4096, per_device_batch_size=64, cutoff_len=1024), LLAMA_7B, world_size=1)
    assert small.per_rank == plan(config(tokens_per_batch=4096, per_device_batch_size=1, cutoff_len=1024), LLAMA_7B,
                                  world_size=1).per_rank


def test_config_refuses_bad_batch_values():
    from tuneflow.core.loading import ConfigError, load_config

    base = {"dataset": {"name_or_path": "x"}}
    for train, message in (({"per_device_batch_size": 0}, "train.per_device_batch_size: must be 'auto' or at least 1"),
                           ({"per_device_batch_size": "max"}, "train.per_device_batch_size"),
                           ({"tokens_per_batch": 4}, "train.tokens_per_batch: must be 'auto' or at least 8 tokens"),
                           ({"tokens_per_batch": 4096, "packing": False},
                            "train.packing: must be true when train.tokens_per_batch is set"),
                           ({"loss_chunk_tokens": -1}, "train.loss_chunk_tokens")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load_config(data={**base, "train": train})
    cfg = load_config(data={**base, "train": {"per_device_batch_size": "auto", "tokens_per_batch": "auto"}})
    assert cfg.train.per_device_batch_size == "auto" and cfg.train.tokens_per_batch == "auto"


def test_cli_json_reports_the_chosen_batch_size(tmp_path, tiny_assets, capsys):
    path = write_config(tmp_path, tiny_assets["model"], per_device_batch_size="auto")
    assert run_plan(["--config", str(path), "--gpu-memory", "2GiB", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    cfg = config(model=tiny_assets["model"], per_device_batch_size="auto")
    model_config = json.loads((Path(tiny_assets["model"]) / "config.json").read_text())
    best = largest_batch_that_fits(cfg, model_config, parse_size("2GiB"), world_size=1)
    assert data["per_device_batch_size"] == best > 4 and data["fits"] is True
    assert f"train.per_device_batch_size: auto -> {best}: the largest that fits a 2 GiB GPU" in captured.err


def test_dpo_counts_both_answers_of_each_pair_and_the_full_logits():
    """A DPO micro-batch of n pairs is 2n padded sequences (chosen and rejected) with TRL's full-logits loss: as an
    SFT batch of 2n padded rows without the chunked loss."""
    base = dict(cutoff_len=1024, deepspeed="zero2")
    dpo = TuneflowConfig.model_validate({"dataset": {"name_or_path": "x", "format": "preference"},
                                         "model": {"name_or_path": "m"}, "prep": {"cutoff_len": 1024},
                                         "train": {"objective": "dpo", "per_device_batch_size": 2, "nproc_per_node": 1,
                                                   "deepspeed": "zero2"}})
    pairs = plan(dpo, LLAMA_7B, world_size=1).per_rank
    rows = plan(config(per_device_batch_size=4, packing=False, loss_chunk_tokens=0, **base), LLAMA_7B,
                world_size=1).per_rank
    assert pairs == rows
    assert pairs["activations"] > plan(config(per_device_batch_size=2, packing=False, **base), LLAMA_7B,
                                       world_size=1).per_rank["activations"] * 1.8


def test_dpo_of_every_weight_counts_its_frozen_reference_copy():
    """dpo over full or freeze holds a frozen copy of the model (TRL's reference; ZeRO-3 shards it), `tuneflow plan`
    says so; over an adapter there is none (the adapter switched off is the reference)."""
    def dpo(method, ds, world):
        cfg = {"dataset": {"name_or_path": "x", "format": "preference"},
               "train": {"objective": "dpo", "method": method, "deepspeed": ds, "nproc_per_node": world}}
        return plan(TuneflowConfig.model_validate(cfg), LLAMA_7B, world_size=world)
    one = dpo("full", "zero2", 1).per_rank["reference_weights"]
    four, lora = dpo("full", "zero3", 4), dpo("lora", "zero2", 1)
    assert one == ModelShape.from_config(LLAMA_7B).total_params() * 2 < 4 * four.per_rank[
        "reference_weights"] < 4 * one / 3
    assert lora.per_rank["reference_weights"] == 0 and "reference" not in render(lora, "m") and "DPO reference (a " \
        "frozen copy of the model)" in render(four, "m")
