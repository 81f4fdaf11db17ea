"""Benchmark scoring throughput (eval.benchmarks): questions/s of a team's multiple-choice set scored by
lm-evaluation-harness on a loaded model, batched (as evaluate scores, eval.batch_size) vs one question at a time.

    make bench                      # or: .venv/bin/python -m bench.scoring [--questions 120] [--fewshot 3]

The model is the random-init Llama of bench.train (hidden 512, 4 layers) in fp32, with its BPE tokenizer; the set is
synthetic (four choices, questions of 20-60 words), written and scored through tuneflow's own path
(`tuneflow.modeling.benchmarks`: the task YAML, `score`). Each variant is scored once to warm up and once timed, with
the harness's task index built beforehand (it is built once per process). Every variant must give the same accuracy.
Results go to bench/results-scoring.json with the machine, its CPU capability and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from importlib import metadata
from pathlib import Path

from bench.train import build_assets, length_mix
from tuneflow.modeling.demo import WORDS_EN

RESULTS = Path(__file__).with_name("results-scoring.json")


def question_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"question": " ".join(rng.choices(WORDS_EN, k=rng.randint(20, 60))) + "?",
             "choices": [" ".join(rng.choices(WORDS_EN, k=rng.randint(1, 4))) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=120)
    parser.add_argument("--fewshot", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8,32")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneflow.data.multiple_choice import write_questions
    from tuneflow.modeling.benchmarks import Benchmark, score, task_manager, write_team_task

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        root = Path(tmp)
        model_dir, _ = build_assets(root, length_mix(400))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        questions = write_questions(question_rows(args.questions), root / "data" / "set.jsonl")
        task = write_team_task("set", questions, root / "tasks")
        benches = [Benchmark("set", task, num_fewshot=args.fewshot)]
        task_manager(root / "tasks")  # the harness's task index, built once per process
        variants = {}
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            score(model, tokenizer, benches, root / "tasks", batch)  # warm-up
            start = time.perf_counter()
            metrics, _ = score(model, tokenizer, benches, root / "tasks", batch)
            seconds = time.perf_counter() - start
            variants[f"batch_{batch}"] = {"seconds": round(seconds, 2),
                                          "questions_per_s": round(args.questions / seconds, 2),
                                          "acc": metrics["bench.set.acc"]}
            print(f"batch {batch}: {seconds:.1f} s, {args.questions / seconds:.1f} questions/s", flush=True)
    one = variants["batch_1"]["seconds"] if "batch_1" in variants else None
    for v in variants.values():
        v["speedup_over_batch_1"] = round(one / v["seconds"], 2) if one else None
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    **{lib: metadata.version(lib) for lib in ("torch", "transformers", "lm_eval")}},
        "settings": {"questions": args.questions, "choices": 4, "num_fewshot": args.fewshot, "dtype": "fp32",
                     "model": "llama hidden 512, 4 layers, 8 heads (4 kv), vocab ~4k, random init"},
        "variants": variants,
        "same_accuracy": len({v["acc"] for v in variants.values()}) == 1,
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
