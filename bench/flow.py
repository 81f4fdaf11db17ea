"""Flow overhead per stage: one real `tuneflow run` of the demo config, its wall time set against each stage's work.

    make bench                      # or: .venv/bin/python -m bench.flow

Builds the demo assets in a temporary folder, runs `tuneflow run --config configs/demo.yaml` (the demo config as
shipped, its paths pointed at those assets; Prefect's ephemeral server, a fresh MLflow sqlite store) and reads
summary.json: each stage's wall time as the flow measured it. Each stage's *work* is then timed on the same inputs
without Prefect or MLflow:

- download: the pre-flight checks and pinning of the local model and dataset (`tuneflow.sources.preflight.preflight`);
- prepare:  tokenising the dataset (`tuneflow.data.prepare.build`);
- train:    the Trainer's own loop (`train_runtime` in the train stage's MLflow run; torchrun start, model load and
            the adapter's save and upload count as overhead);
- evaluate: loading the base and the trained model, the held-out loss and the answers of each (the stage's
            own `measure`);
- export:   merging the adapter, writing the shards, reloading and answering the parity prompts.

overhead = wall - work, per stage; and the whole run's wall minus the stages' walls (process start, the ephemeral
Prefect server, the parent MLflow run). Work is timed warm (each call made twice, the second counted), so the
overhead includes the stage's share of cold start-up. Results go to bench/results-flow.json.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results-flow.json")


def timed(fn, *args) -> float:
    """Seconds of ``fn(*args)``, warm: the first call (imports, kernel set-up) is not counted."""
    fn(*args)
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


WORK = {"download": "pre-flight checks + pinning (local paths: nothing to download)",
        "prepare": "tokenising the dataset", "train": "the Trainer's loop (train_runtime)",
        "evaluate": "loading base + trained model, held-out loss and answers of each",
        "export": "merge, write shards, reload, answer the parity prompts"}


def main() -> None:
    import torch
    from mlflow import MlflowClient

    from tuneflow.core.loading import load_config
    from tuneflow.data.prepare import build as prepare
    from tuneflow.modeling.demo import build as demo_assets
    from tuneflow.modeling.generation import generate
    from tuneflow.modeling.load import DTYPES, load_merged, load_pretrained, load_tokenizer
    from tuneflow.modeling.precision import compute_dtype, this_machine
    from tuneflow.sources.preflight import preflight

    with tempfile.TemporaryDirectory(prefix="tuneflow-bench-flow-") as tmp:
        root = Path(tmp)
        assets = demo_assets(root / "assets")
        raw = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
        raw["model"]["name_or_path"] = str(assets["model"])
        raw["dataset"]["name_or_path"] = str(assets["data"])
        raw["output_dir"] = str(root / "runs")
        raw["tracking"]["uri"] = f"sqlite:///{root}/mlflow.db"
        config = root / "demo.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "TUNEFLOW_"))}
        env.update(TUNEFLOW_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1")
        print("bench.flow: tuneflow run --config configs/demo.yaml (the demo's paths in a temporary folder) ...",
              flush=True)
        start = time.perf_counter()
        done = subprocess.run([str(Path(sys.executable).parent / "tuneflow"), "run", "--config", str(config)],
                              cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"tuneflow run failed:\n{done.stderr[-4000:]}")
        summary = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
        stages = summary["stages"]
        client = MlflowClient(raw["tracking"]["uri"])
        metrics = {name: client.get_run(stages[name]["mlflow_run_id"]).data.metrics for name in ("train", "evaluate")}

        cfg = load_config(str(config))
        print("bench.flow: timing each stage's work without Prefect or MLflow ...", flush=True)
        work = {"download": timed(preflight, cfg, logging.getLogger("bench"))}
        prepared = iter(range(2))
        work["prepare"] = timed(lambda: prepare(cfg, assets["model"], [assets["data"]],
                                                root / f"prepared{next(prepared)}"))
        work["train"] = metrics["train"]["train_runtime"]

        def evaluate() -> None:
            from datasets import load_from_disk

            from tuneflow.modeling.load import load_base, load_trained
            from tuneflow.modeling.metrics import measure

            split = load_from_disk(str(root / "prepared0"))["eval"]
            rows = split.select(range(min(cfg.eval.max_samples, len(split))))
            examples = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
            prompts, references = [json.loads(p) for p in rows["prompt"]], list(rows["reference"])
            tokenizer = load_tokenizer(assets["model"], cfg)
            base = load_base(assets["model"], cfg, quantized=True, device_map={"": "cpu"})
            measure(base, tokenizer, examples, prompts, references, cfg)
            tuned = load_trained(assets["model"], summary["adapter_dir"], cfg, device_map={"": "cpu"}, base=base)
            measure(tuned, tokenizer, examples, prompts, references, cfg)

        work["evaluate"] = timed(evaluate)

        def export() -> None:
            dtype = DTYPES[cfg.export.dtype]
            merged = load_merged(assets["model"], summary["adapter_dir"], cfg, dtype, {"": "cpu"})
            tokenizer = load_tokenizer(assets["model"], cfg)
            merged.save_pretrained(root / "export", max_shard_size=cfg.export.max_shard_size)
            tokenizer.save_pretrained(root / "export")
            del merged
            reloaded = load_pretrained(root / "export", cfg, compute_dtype(cfg), {"": "cpu"})  # as the stage does
            prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(cfg.export.parity_samples)]
            generate(reloaded, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)

        work["export"] = timed(export)

    per_stage = {name: {"wall_s": stages[name]["seconds"], "work_s": round(work[name], 2),
                        "work": WORK[name],
                        "overhead_s": round(stages[name]["seconds"] - work[name], 2)} for name in work}
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": this_machine().describe(),
                    **{lib: metadata.version(lib) for lib in ("torch", "transformers", "prefect", "mlflow")}},
        "settings": {"config": "configs/demo.yaml (paths pointed at freshly built demo assets)",
                     "train": {k: raw["train"][k] for k in ("method", "max_steps", "per_device_batch_size",
                                                            "nproc_per_node", "deepspeed", "packing")},
                     "torch_threads": torch.get_num_threads()},
        "run_wall_s": round(wall, 1),
        "stages": per_stage,
        "outside_stages_s": round(wall - sum(s["seconds"] for s in stages.values() if "seconds" in s), 1),
    }
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
