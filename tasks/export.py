"""Stage 5, export: merge the adapter into the base and write a standalone, sharded safetensors model.

For qlora the adapter is merged into the *dequantised* NF4 base (the weights it was trained against), never into
4-bit weights; merging into the original 16-bit weights would shift every answer a little. The export is written
to a temporary folder and renamed, then reloaded and asked the evaluation prompts: its greedy answers must match
the ones base + adapter gave in evaluate (recorded as the export_parity metric).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.context import RunContext
from tasks.download import DownloadResult
from tasks.evaluate import EvalResult
from tasks.train import TrainResult
from tuneflow.config import TuneflowConfig
from tuneflow.tracking import log_metrics


class ExportResult(BaseModel):
    export_dir: str
    shards: list[str]
    parity: float
    mlflow_run_id: str


def model_card(cfg: TuneflowConfig, downloaded: DownloadResult, evaluated: EvalResult) -> str:
    rows = "\n".join(
        f"| {k} | {evaluated.base_metrics.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in evaluated.metrics.items()
    )
    return f"""---
base_model: {cfg.model.name_or_path}
library_name: transformers
tags: [tuneflow, {cfg.train.method}]
---
# {cfg.run_name}

Fine-tuned with tuneflow ({cfg.train.method}) from `{cfg.model.name_or_path}` on `{cfg.dataset.name_or_path}`.

## Lineage
- base model: `{cfg.model.name_or_path}` at `{downloaded.model.revision}`
- dataset: `{cfg.dataset.name_or_path}` at `{downloaded.dataset.revision}` ({cfg.dataset.format} format)

## Evaluation (held-out split)
| metric | base | tuned |
|---|---|---|
{rows}

## Config
```json
{json.dumps(cfg.model_dump(mode="json"), indent=1)}
```
"""


def merge(cfg: TuneflowConfig, model_dir: str, weights_dir: str):
    import torch

    from tuneflow.modeling import DTYPES, load_base

    dtype = DTYPES[cfg.export.dtype]
    device_map = {"": "cuda"} if cfg.export.device == "auto" and torch.cuda.is_available() else {"": "cpu"}
    if cfg.train.method in ("full", "freeze"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype, device_map=device_map)
    from peft import PeftModel

    base = load_base(model_dir, cfg, quantized=True, device_map=device_map)
    if cfg.train.method == "qlora":
        base = base.dequantize()
    base = base.to(dtype)
    return PeftModel.from_pretrained(base, weights_dir).merge_and_unload()


def write_export(merged, tokenizer, card: str, final: Path, max_shard_size: str) -> list[str]:
    """Write the model, tokenizer and card to a temporary folder beside ``final``, then rename it into place:
    a kill at any moment leaves either no export or a complete one at ``final``, never a half-written one."""
    staging = final.parent / f".{final.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an attempt that was killed
    merged.save_pretrained(staging, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return sorted(p.name for p in final.glob("*.safetensors"))


@task(name="export", cache_policy=NO_CACHE)
def export(
    cfg: TuneflowConfig, downloaded: DownloadResult, trained: TrainResult, evaluated: EvalResult, ctx: RunContext
) -> ExportResult:
    from transformers import AutoModelForCausalLM

    from tuneflow.generation import generate
    from tuneflow.modeling import DTYPES, load_tokenizer

    logger = get_run_logger()
    final = Path(ctx.run_dir) / "export"
    with ctx.stage("export") as (client, run_id):
        merged = merge(cfg, downloaded.model.path, trained.weights_dir)
        shards = write_export(merged, load_tokenizer(downloaded.model.path, cfg),
                              model_card(cfg, downloaded, evaluated), final, cfg.export.max_shard_size)
        del merged
        logger.info("export: %d shard(s) in %s", len(shards), final)

        records = [json.loads(line) for line in open(evaluated.predictions_file, encoding="utf-8")]
        records = records[: cfg.export.parity_samples]
        reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=DTYPES[cfg.export.dtype], device_map={"": "cpu"})
        answers = generate(reloaded, load_tokenizer(final, cfg), [r["prompt"] for r in records],
                           cfg.eval.max_new_tokens, cfg.eval.batch_size)
        same = [a == r["tuned"] for a, r in zip(answers, records)]
        parity = sum(same) / len(same)
        for a, r in zip(answers, records):
            if a != r["tuned"]:
                logger.warning("export: answer differs from base + adapter\n  adapter: %r\n  export:  %r", r["tuned"], a)
        logger.info("export: %d/%d answers identical to base + adapter", sum(same), len(same))
        log_metrics(client, run_id, {"export_parity": parity, "shards": len(shards)})
        client.log_artifacts(run_id, trained.weights_dir, artifact_path="adapter")
        client.log_artifacts(run_id, str(final), artifact_path="export")
        return ExportResult(export_dir=str(final), shards=shards, parity=parity, mlflow_run_id=run_id)
