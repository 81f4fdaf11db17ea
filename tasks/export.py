"""Stage 5, export: merge the trained weights into the base and write a standalone, sharded safetensors model.

The export is written to a temporary folder and renamed (`write_export`), then reloaded and asked the evaluation
prompts: its greedy answers must match the ones base + adapter gave in evaluate (the export_parity metric). It is
logged as an MLflow model (transformers flavour) of the pipeline's parent run and an output of this stage's run, with
the held-out metrics linked to it: the
model is what the registry's versions point to, and `models:/<id>` is how any machine loads it
(`tuneflow.sources.registered.registered_folder`). The model card is logged beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.files import staged
from tuneflow.core.results import PREDICTIONS, DownloadResult, EvalResult, ExportResult, TrainResult
from tuneflow.sources.hub import fetch
from tuneflow.tracking.artifacts import materialize
from tuneflow.tracking.context import RunContext
from tuneflow.tracking.runs import log_metrics, log_model


def model_card(cfg: TuneflowConfig, downloaded: DownloadResult, evaluated: EvalResult) -> str:
    rows = "\n".join(
        f"| {k} | {evaluated.base_metrics.get(k, float('nan')):.4f} | {v:.4f} |" for k, v in evaluated.metrics.items()
    )
    names = ", ".join(f"`{source.name_or_path}`" for _, source in cfg.sources)
    datasets = "\n".join(f"- {key}: `{source.name_or_path}` at `{ref.revision}` ({source.format} format"
                         + (f", weight {source.weight:g})" if len(cfg.sources) > 1 and key != "eval_dataset" else ")")
                         for (key, source), ref in zip(cfg.all_sources, downloaded.all_datasets, strict=True))
    hub_base = f"base_model: {cfg.model.name_or_path}\n" if downloaded.model.source == "hub" else ""  # a Hub id only
    return f"""---
{hub_base}library_name: transformers
tags: [tuneflow, {cfg.train.method}]
---
# {cfg.run_name}

Fine-tuned with tuneflow ({cfg.train.method}) from `{cfg.model.name_or_path}` on {names}.

## Lineage
- base model: `{cfg.model.name_or_path}` at `{downloaded.model.revision}`
{datasets}

## Evaluation (held-out split)
| metric | base | tuned |
|---|---|---|
{rows}

## Config
```json
{json.dumps(cfg.model_dump(mode="json"), indent=1)}
```
"""


def write_export(merged, tokenizer, card: str, final: Path, max_shard_size: str) -> list[str]:
    """Write the model, tokenizer and card to a temporary folder beside ``final``, then rename it into place:
    a kill at any moment leaves either no export or a complete one at ``final``, never a half-written one."""
    with staged(final) as staging:  # a staging folder left by an attempt that was killed is cleared first
        merged.save_pretrained(staging, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return sorted(p.name for p in final.glob("*.safetensors"))


@task(name="export", cache_policy=NO_CACHE)
def export(
    cfg: TuneflowConfig, downloaded: DownloadResult, trained: TrainResult, evaluated: EvalResult, ctx: RunContext
) -> ExportResult:
    import torch

    from tuneflow.modeling.generation import generate
    from tuneflow.modeling.load import DTYPES, load_merged, load_pretrained, load_tokenizer
    from tuneflow.modeling.precision import compute_dtype

    logger = get_run_logger()
    final = Path(ctx.run_dir) / "export"
    final.parent.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg.export.dtype]
    with ctx.stage("export") as (client, run_id):
        model_dir = fetch(downloaded.model, cfg, logger)
        device_map = {"": "cuda"} if cfg.export.device == "auto" and torch.cuda.is_available() else {"": "cpu"}
        merged = load_merged(model_dir, materialize(trained.weights, ctx.tracking_uri), cfg, dtype, device_map)
        shards = write_export(merged, load_tokenizer(model_dir, cfg), model_card(cfg, downloaded, evaluated), final,
                              cfg.export.max_shard_size)
        del merged
        logger.info("export: %d shard(s) in %s", len(shards), final)

        predictions = materialize(evaluated.predictions, ctx.tracking_uri) / PREDICTIONS
        records = [json.loads(line) for line in open(predictions, encoding="utf-8")][: cfg.export.parity_samples]
        # Answered in the precision evaluation computed in on this machine (train.precision's rule), from the weights
        # as shipped (export.dtype): what a user who loads the export here gets.
        compute, tokenizer = compute_dtype(cfg), load_tokenizer(final, cfg)
        reloaded = load_pretrained(final, cfg, compute, {"": "cpu"})
        answers = generate(reloaded, tokenizer, [r["prompt"] for r in records], cfg.eval.max_new_tokens,
                           cfg.eval.batch_size)
        if compute != dtype:  # the MLflow model holds the weights as exported
            del reloaded
            reloaded = load_pretrained(final, cfg, dtype, {"": "cpu"})
        same = [a == r["tuned"] for a, r in zip(answers, records)]
        parity = sum(same) / len(same)
        for a, r in zip(answers, records):
            if a != r["tuned"]:
                logger.warning("export: answer differs from base + adapter\n  adapter: %r\n  export:  %r", r["tuned"],
                               a)
        logger.info("export: %d/%d answers identical to base + adapter", sum(same), len(same))
        log_metrics(client, run_id, {"export_parity": parity, "shards": len(shards)})
        client.log_artifact(run_id, str(final / "README.md"), "model_card")
        model_id = log_model(ctx.tracking_uri, ctx.parent_run_id, run_id, reloaded, tokenizer, cfg.export.dtype,
                             {**evaluated.metrics, "export_parity": parity})
        logger.info("export: logged as MLflow model models:/%s", model_id)
        return ExportResult(model_id=model_id, shards=shards, parity=parity, mlflow_run_id=run_id)
