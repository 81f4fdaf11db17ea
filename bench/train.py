"""Training and generation throughput on this machine, variants side by side in one run.

    make bench                      # or: .venv/bin/python -m bench.train [--steps 30] [--slow-steps 4]

- training: the real worker (`tuneflow.training.worker` under torchrun, 1 process, QLoRA, precision auto, no
  DeepSpeed) on instruction rows of mixed lengths: padded, packed (padding-free, the default), packed with
  micro-batches sized by a token budget (train.tokens_per_batch = the rows' mean length x the row count), packed with
  the full-logits loss instead of the chunked one (train.loss_chunk_tokens: 0), and packed with an explicit
  train.precision: bf16; real (non-padding) tokens per second as the HF Trainer counts them, the padding share of the
  padded batches, each run's peak RSS, and the per-step losses of the default against bf16;
- the plain TRL script users would write instead (bench/trl_script.py: SFTTrainer + PEFT + bitsandbytes, TRL's
  defaults, bf16; same model, rows, LoRA, quantisation, micro-batch, steps and learning rate), and the same script
  computing in fp32;
- evaluation's generation: greedy answers batched (eval.batch_size 8) vs one prompt at a time.

On a CPU without native bf16 (AVX2 only: bf16 is emulated, 30-40x slower) the bf16 variants run --slow-steps steps,
and the default runs that many steps once more (packed_short), so each ratio compares runs of equal length; the
whole bench then fits in about 15 minutes on 2 cores. The model is a random-init Llama (hidden 512, 4 layers) with a
BPE tokenizer trained on the rows (nothing is downloaded). Results go to bench/results-train.json (with the machine,
its CPU capability, versions and settings) and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import tempfile
import time
from importlib import metadata
from pathlib import Path

from tuneflow.modeling.demo import CHATML_TEMPLATE, WORDS_EN, WORDS_ZH, build_tokenizer

RESULTS = Path(__file__).with_name("results-train.json")


def length_mix(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose answers span ~5 to ~400 words (log-normal), half English, half Chinese."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words, sep = (WORDS_ZH, "") if i % 2 else (WORDS_EN, " ")
        answer = min(400, max(5, int(rng.lognormvariate(3.6, 0.9))))
        rows.append({"instruction": sep.join(rng.choices(words, k=rng.randint(4, 30))),
                     "output": sep.join(rng.choices(words, k=answer))})
    return rows


def build_assets(root: Path, rows: list[dict]) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    data = root / "train.json"
    data.write_text(json.dumps(rows, ensure_ascii=False))
    model_dir = root / "model"
    tokenizer = build_tokenizer([f"{r['instruction']} {r['output']}" for r in rows], model_dir, vocab_size=4096)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    return model_dir, data


def train_variant(root: Path, cfg, model_dir: Path, data_dir: Path, name: str, **train) -> dict:
    from tuneflow.training.launch.launcher import launch
    from tuneflow.training.spec import TrainOutcome, TrainSpec

    out = root / name
    out.mkdir()
    print(f"bench.train: {name} ({', '.join(f'{k}={v}' for k, v in train.items())}) ...", flush=True)
    variant = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    spec = out / "spec.json"
    spec.write_text(TrainSpec(config=variant, model_dir=str(model_dir), data_dir=str(data_dir),
                              output_dir=str(out)).model_dump_json())
    lines: list[str] = []
    launch(spec, 1, 0, {"TOKENIZERS_PARALLELISM": "false"}, on_line=lines.append)
    history = TrainOutcome.model_validate_json((out / "result.json").read_text()).log_history
    final, tokens = history[-1], max(h.get("num_input_tokens_seen", 0) for h in history)
    text = "\n".join(lines)
    padding = [float(x) for x in re.findall(r"padding_fraction=([0-9.e-]+)", text)]
    rss = re.search(r"peak_rss_rank0=([0-9.]+) GiB", text)
    return {"settings": {k: getattr(variant.train, k) for k in ("packing", "per_device_batch_size", "tokens_per_batch",
                                                                "loss_chunk_tokens", "precision", "max_steps")},
            "real_tokens_per_s": tokens / final["train_runtime"], "train_runtime_s": final["train_runtime"],
            "real_tokens": tokens, "steps": final.get("step"),
            "padding_fraction": padding[-1] if padding else None,
            "peak_rss_gib": float(rss.group(1)) if rss else None, "train_loss": final["train_loss"]}


def plain_trl(model_dir: Path, data: Path, steps: int, batch: int, dtype: str) -> dict:
    """bench/trl_script.py in its own process."""
    import subprocess
    import sys

    print(f"bench.train: plain TRL script ({dtype}, {steps} steps) ...", flush=True)
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("trl_script.py")), "--model", str(model_dir),
                           "--data", str(data), "--steps", str(steps), "--batch", str(batch), "--dtype", dtype],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"the plain TRL script failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "steps": steps}


def losses(root: Path, name: str) -> list[float]:
    """The per-step training losses of a tuneflow variant, in step order."""
    from tuneflow.training.spec import TrainOutcome

    history = TrainOutcome.model_validate_json((root / name / "result.json").read_text()).log_history
    return [h["loss"] for h in sorted(history, key=lambda h: h.get("step", 0)) if "loss" in h]


def generation(model_dir: Path, cfg, prompts: list[list[dict]], max_new_tokens: int) -> dict:
    from tuneflow.modeling.generation import generate
    from tuneflow.modeling.load import load_pretrained, load_tokenizer
    from tuneflow.modeling.precision import compute_dtype

    model = load_pretrained(model_dir, cfg, compute_dtype(cfg), {"": "cpu"})
    tokenizer = load_tokenizer(model_dir, cfg)
    result = {}
    for batch in (1, 8):
        start = time.perf_counter()
        generate(model, tokenizer, prompts, max_new_tokens, batch)
        result[f"batch_{batch}_answers_per_s"] = len(prompts) / (time.perf_counter() - start)
    result["speedup"] = result["batch_8_answers_per_s"] / result["batch_1_answers_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--slow-steps", type=int, default=4,
                        help="steps of the bf16 variants on a CPU without native bf16 (emulated there, 30-40x slower)")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    args = parser.parse_args()

    import torch

    from tuneflow.core.config import TuneflowConfig
    from tuneflow.data.prepare import build
    from tuneflow.modeling.precision import resolved, this_machine

    machine = this_machine()
    bf16_steps = args.steps if machine.gpu or machine.cpu_bf16 else min(args.slow_steps, args.steps)
    print(f"bench.train: {machine.describe()}, {os.cpu_count()} cores; bf16 variants run {bf16_steps} steps, "
          f"the others {args.steps}", flush=True)
    rows = length_mix(args.rows)
    with tempfile.TemporaryDirectory(prefix="tuneflow-bench-") as tmp:
        root = Path(tmp)
        model_dir, data = build_assets(root, rows)
        cfg = TuneflowConfig.model_validate({
            "model": {"name_or_path": str(model_dir), "chat_template": CHATML_TEMPLATE},
            "dataset": {"name_or_path": str(data), "eval_size": 32},
            "prep": {"cutoff_len": 1024},
            "train": {"method": "qlora", "deepspeed": "none", "nproc_per_node": 1,  # precision: auto, the default
                      "max_steps": args.steps, "per_device_batch_size": args.batch,
                      "gradient_accumulation_steps": 1, "save_steps": 10**6, "learning_rate": 2e-4},
        })
        auto = resolved(cfg).precision
        stats = build(cfg, model_dir, [data], root / "prepared")
        # the token budget holds, on average, as many tokens as `batch` rows do
        budget = int(round(stats["tokens_mean"] * args.batch))
        variants = {"padded": {"packing": False}, "packed": {"packing": True},
                    "packed_token_budget": {"packing": True, "tokens_per_batch": budget},
                    "packed_full_logits_loss": {"packing": True, "loss_chunk_tokens": 0},
                    "packed_bf16": {"packing": True, "precision": "bf16", "max_steps": bf16_steps}}
        if bf16_steps != args.steps:  # the default over as many steps as the slow variants, for like-with-like ratios
            variants["packed_short"] = {"packing": True, "max_steps": bf16_steps}
        training = {name: train_variant(root, cfg, model_dir, root / "prepared", name, **train)
                    for name, train in variants.items()}
        short = "packed_short" if "packed_short" in training else "packed"
        training["plain_trl"] = plain_trl(model_dir, data, bf16_steps, args.batch, "bf16")
        training["plain_trl_fp32"] = plain_trl(model_dir, data, args.steps, args.batch, "fp32")
        ratios = {"packed_over_padded": ("packed", "padded"),
                  "packed_token_budget_over_padded": ("packed_token_budget", "padded"),
                  "default_over_bf16": (short, "packed_bf16"),
                  "default_over_plain_trl": (short, "plain_trl"),
                  "default_over_plain_trl_fp32": ("packed", "plain_trl_fp32")}
        for key, (variant, baseline) in ratios.items():
            if "real_tokens_per_s" in training[baseline]:
                training[key] = training[variant]["real_tokens_per_s"] / training[baseline]["real_tokens_per_s"]
        default_losses, bf16_losses = losses(root, short), losses(root, "packed_bf16")
        training["loss_max_abs_diff_default_vs_bf16"] = max(abs(a - b) for a, b in zip(default_losses, bf16_losses))
        training["losses_default_vs_bf16"] = {short: default_losses, "packed_bf16": bf16_losses}
        prompts = [[{"role": "user", "content": r["instruction"]}] for r in rows[:32]]
        gen = generation(model_dir, cfg, prompts, 32)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": machine.describe(),
                    "precision_auto": auto,
                    **{lib: metadata.version(lib) for lib in ("torch", "transformers", "peft", "bitsandbytes")}},
        "settings": {"rows": args.rows, "steps": args.steps, "bf16_steps": bf16_steps,
                     "rows_per_micro_batch": args.batch,
                     "model": "llama hidden 512, 4 layers, 8 heads (4 kv), vocab ~4k, random init",
                     "tokens_mean": stats["tokens_mean"], "tokens_p95": stats["tokens_p95"],
                     "tokens_max": stats["tokens_max"], "method": f"qlora, precision auto ({auto} here), no DeepSpeed, "
                     "1 process", "token_budget": budget, "lora": "rank 16, alpha 32, dropout 0.05, all-linear",
                     "learning_rate": 2e-4, "cutoff_len": 1024},
        "training": training,
        "generation": gen,
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
