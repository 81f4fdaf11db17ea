"""Training and generation throughput on this machine, variants side by side in one run.

    make bench                      # or: .venv/bin/python -m bench.train [--steps 30]

- training: the real worker (`tuneflow.training.worker` under torchrun, 1 process, QLoRA bf16, no DeepSpeed) on
  instruction rows of mixed lengths: padded, packed (padding-free, the default), packed with micro-batches sized by
  a token budget (train.tokens_per_batch = the rows' mean length x the row count), and packed with the full-logits
  loss instead of the chunked one (train.loss_chunk_tokens: 0); real (non-padding) tokens per second as the HF
  Trainer counts them, the padding share of the padded batches, and each run's peak RSS;
- the plain TRL script users would write instead (bench/trl_script.py: SFTTrainer + PEFT + bitsandbytes, TRL's
  defaults, same model, rows, LoRA, quantisation, micro-batch, steps and learning rate; `make bench` installs trl);
- evaluation's generation: greedy answers batched (eval.batch_size 8) vs one prompt at a time.

The model is a random-init Llama (hidden 512, 4 layers) with a BPE tokenizer trained on the rows (nothing is
downloaded). Results go to bench/results-train.json (with the machine, versions and settings) and are printed.
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

from tuneflow.demo import CHATML_TEMPLATE, WORDS_EN, WORDS_ZH, build_tokenizer

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
    from tuneflow.training.launcher import launch
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
                                                                "loss_chunk_tokens")},
            "real_tokens_per_s": tokens / final["train_runtime"], "train_runtime_s": final["train_runtime"],
            "real_tokens": tokens, "steps": final.get("step"),
            "padding_fraction": padding[-1] if padding else None,
            "peak_rss_gib": float(rss.group(1)) if rss else None, "train_loss": final["train_loss"]}


def plain_trl(model_dir: Path, data: Path, steps: int, batch: int) -> dict:
    """bench/trl_script.py in its own process, when trl can be imported; else a note saying how to include it."""
    import subprocess
    import sys

    if subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode != 0:
        return {"skipped": "trl is not importable: `make bench` installs it (pip install 'trl>=1.7,<2')"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("trl_script.py")), "--model", str(model_dir),
                           "--data", str(data), "--steps", str(steps), "--batch", str(batch)],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"the plain TRL script failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generation(model_dir: Path, cfg, prompts: list[list[dict]], max_new_tokens: int) -> dict:
    import torch

    from tuneflow.generation import generate
    from tuneflow.modeling import load_pretrained, load_tokenizer

    model = load_pretrained(model_dir, cfg, torch.bfloat16, {"": "cpu"})
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
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    args = parser.parse_args()

    from tuneflow.config import TuneflowConfig
    from tuneflow.data.prepare import build

    rows = length_mix(args.rows)
    with tempfile.TemporaryDirectory(prefix="tuneflow-bench-") as tmp:
        root = Path(tmp)
        model_dir, data = build_assets(root, rows)
        cfg = TuneflowConfig.model_validate({
            "model": {"name_or_path": str(model_dir), "chat_template": CHATML_TEMPLATE},
            "dataset": {"name_or_path": str(data), "eval_size": 32},
            "prep": {"cutoff_len": 1024},
            "train": {"method": "qlora", "precision": "bf16", "deepspeed": "none", "nproc_per_node": 1,
                      "max_steps": args.steps, "per_device_batch_size": args.batch,
                      "gradient_accumulation_steps": 1, "save_steps": 10**6, "learning_rate": 2e-4},
        })
        stats = build(cfg, model_dir, data, root / "prepared")
        # the token budget holds, on average, as many tokens as `batch` rows do
        budget = int(round(stats["tokens_mean"] * args.batch))
        variants = {"padded": {"packing": False}, "packed": {"packing": True},
                    "packed_token_budget": {"packing": True, "tokens_per_batch": budget},
                    "packed_full_logits_loss": {"packing": True, "loss_chunk_tokens": 0}}
        training = {name: train_variant(root, cfg, model_dir, root / "prepared", name, **train)
                    for name, train in variants.items()}
        training["plain_trl"] = plain_trl(model_dir, data, args.steps, args.batch)
        for variant in ("packed", "packed_token_budget"):
            for baseline in ("padded", "plain_trl"):
                if "real_tokens_per_s" in training[baseline]:
                    training[f"{variant}_over_{baseline}"] = (training[variant]["real_tokens_per_s"]
                                                              / training[baseline]["real_tokens_per_s"])
        prompts = [[{"role": "user", "content": r["instruction"]}] for r in rows[:32]]
        gen = generation(model_dir, cfg, prompts, 32)

    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    **{lib: metadata.version(lib) for lib in ("torch", "transformers", "peft", "bitsandbytes")}},
        "settings": {"rows": args.rows, "steps": args.steps, "rows_per_micro_batch": args.batch,
                     "model": "llama hidden 512, 4 layers, 8 heads (4 kv), vocab ~4k, random init",
                     "tokens_mean": stats["tokens_mean"], "tokens_p95": stats["tokens_p95"],
                     "tokens_max": stats["tokens_max"], "method": "qlora bf16, no DeepSpeed, 1 process",
                     "token_budget": budget, "lora": "rank 16, alpha 32, dropout 0.05, all-linear",
                     "learning_rate": 2e-4, "cutoff_len": 1024},
        "training": training,
        "generation": gen,
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
