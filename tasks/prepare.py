"""Stage 2, prepare: validate every row, render it with the model's chat template, tokenize, mask prompts, split.

The result is an Arrow DatasetDict (train, eval) under <output_dir>/.cache/prepared/<key>, where the key hashes
everything the result depends on (dataset revision, tokenizer revision, prep settings, this code), so later flow
runs with the same inputs reuse it. It is written to a temporary folder and renamed, so a half-written cache entry
is never seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import uuid
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.context import RunContext
from tasks.download import DownloadResult
from tuneflow.config import TuneflowConfig
from tuneflow.tracking import log_metrics, log_params


class PrepareResult(BaseModel):
    data_dir: str
    stats: dict
    cache_hit: bool
    mlflow_run_id: str


def cache_key(cfg: TuneflowConfig, downloaded: DownloadResult) -> str:
    from tuneflow.data import formats, tokenize

    code = inspect.getsource(formats) + inspect.getsource(tokenize) + inspect.getsource(build)
    parts = {
        "dataset": downloaded.dataset.revision,
        "tokenizer": downloaded.model.revision,
        "chat_template": cfg.model.chat_template,
        "format": cfg.dataset.format,
        "eval_size": cfg.dataset.eval_size,
        "seed": cfg.train.seed,
        "prep": cfg.prep.model_dump(),
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def build(cfg: TuneflowConfig, downloaded: DownloadResult, out: Path) -> dict:
    """Tokenize and save the dataset to ``out``; return its statistics."""
    from datasets import Dataset, DatasetDict

    from tuneflow.data.formats import load_dataset_rows, split_indices
    from tuneflow.data.tokenize import encode, prompt_and_reference
    from tuneflow.modeling import load_tokenizer

    tokenizer = load_tokenizer(downloaded.model.path, cfg)
    conversations, invalid = load_dataset_rows(Path(downloaded.dataset.path), cfg)
    train_idx, eval_idx = split_indices(len(conversations), cfg.dataset.eval_size, cfg.train.seed)
    splits, dropped = {}, 0
    lengths, truncated = [], 0
    for split, indices in (("train", train_idx), ("eval", eval_idx)):
        rows = []
        for i in indices:
            enc = encode(tokenizer, conversations[i], cfg.prep.cutoff_len)
            lengths.append(enc["full_length"])
            truncated += enc["full_length"] > cfg.prep.cutoff_len
            if all(label == -100 for label in enc["labels"]):
                dropped += 1  # the answer is entirely past cutoff_len: nothing to learn from
                continue
            prompt, reference = prompt_and_reference(conversations[i])
            rows.append({**enc, "prompt": json.dumps(prompt, ensure_ascii=False), "reference": reference})
        if not rows:
            raise ValueError(f"no {split} rows left: every answer lies past prep.cutoff_len={cfg.prep.cutoff_len}")
        splits[split] = Dataset.from_list(rows)
    DatasetDict(splits).save_to_disk(str(out))
    stats = {
        "rows": len(conversations),
        "train_rows": len(splits["train"]),
        "eval_rows": len(splits["eval"]),
        "dropped_cut_off": dropped,
        "dropped_invalid": sum(invalid.values()),
        "invalid_reasons": dict(invalid),
        "truncation_rate": truncated / len(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_p50": _percentile(lengths, 0.5),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": float(max(lengths)),
        "train_label_tokens": sum(sum(1 for t in r if t != -100) for r in splits["train"]["labels"]),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(cfg: TuneflowConfig, downloaded: DownloadResult, ctx: RunContext) -> PrepareResult:
    logger = get_run_logger()
    with ctx.stage("prepare") as (client, run_id):
        key = cache_key(cfg, downloaded)
        final = Path(cfg.output_dir) / ".cache" / "prepared" / key
        log_params(client, run_id, {"cache_key": key, "data_dir": str(final.resolve())})
        hit = (final / "stats.json").is_file()
        if hit:
            logger.info("prepare: reusing the tokenized dataset in %s (same inputs as an earlier run)", final)
            stats = json.loads((final / "stats.json").read_text())
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = final.parent / f".{key}.{uuid.uuid4().hex[:8]}.partial"
            try:
                stats = build(cfg, downloaded, staging)
                try:
                    staging.rename(final)
                except OSError:  # a concurrent flow finished the same entry first: theirs is identical
                    shutil.rmtree(staging, ignore_errors=True)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            logger.info("prepare: %s", json.dumps(stats))
        log_metrics(client, run_id, {k: v for k, v in stats.items() if isinstance(v, (int, float))})
        client.log_dict(run_id, stats, "prepare_stats.json")
        client.set_tag(run_id, "cache_hit", str(hit).lower())
        return PrepareResult(data_dir=str(final.resolve()), stats=stats, cache_hit=hit, mlflow_run_id=run_id)
