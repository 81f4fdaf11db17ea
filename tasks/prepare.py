"""Stage 2, prepare: validate every row, render it with the model's chat template, tokenize, mask prompts, split.

The result (`tuneflow.data.prepare.build`: an Arrow DatasetDict of train and eval, and stats.json) is cached under
$TUNEFLOW_CACHE/prepared/<key>, where the key hashes everything it depends on (dataset revision, tokenizer
revision, prep settings, the prep code), and logged as the `prepared` artifact of this stage's MLflow run, which is
where training and evaluation read it from on any machine. A later run with the same inputs on the same MLflow
server reuses both the cache entry and the artifact. Entries are written to a temporary folder and renamed, so a
half-written one is never seen.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import uuid
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.files import staged
from tuneflow.core.results import ArtifactRef, DownloadResult, PrepareResult
from tuneflow.sources.hub import fetch
from tuneflow.tracking.artifacts import cache_root, publish, register
from tuneflow.tracking.context import RunContext
from tuneflow.tracking.runs import log_metrics, log_params


def cache_key(cfg: TuneflowConfig, downloaded: DownloadResult) -> str:
    from tuneflow.data import formats, prepare, tokenize

    code = "".join(inspect.getsource(m) for m in (formats, tokenize, prepare))
    parts = {
        # every dataset read, at its commit, with how it is read (format, columns, split, max_samples, weight, ...)
        "datasets": [[ref.revision, source.model_dump(exclude={"revision"})]
                     for ref, (_, source) in zip(downloaded.all_datasets, cfg.all_sources, strict=True)],
        "tokenizer": downloaded.model.revision,
        "chat_template": cfg.model.chat_template,
        "seed": cfg.train.seed,
        "prep": cfg.prep.model_dump(),
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def build_entry(cfg: TuneflowConfig, downloaded: DownloadResult, final: Path, logger) -> None:
    from tuneflow.data.prepare import build

    final.parent.mkdir(parents=True, exist_ok=True)
    with staged(final, keep_existing=True) as staging:  # a concurrent flow may finish the same entry first
        tokenizer_dir = fetch(downloaded.model, cfg, logger, weights=False)
        eval_path = fetch(downloaded.eval_dataset, cfg, logger) if downloaded.eval_dataset else None
        paths = [fetch(ref, cfg, logger) for ref in downloaded.datasets]
        stats = build(cfg, tokenizer_dir, paths, staging, eval_path=eval_path)
        logger.info("prepare: %s", json.dumps(stats))
        if stats["dropped_cut_off"]:
            what = ("pairs whose prompt leaves no room for the answers" if cfg.train.objective != "sft" else
                    "rows whose answer lies entirely")
            logger.warning("prepare: dropped %d %s past prep.cutoff_len=%d; raise it to keep them",
                           stats["dropped_cut_off"], what, cfg.prep.cutoff_len)


def published(final: Path, client, tracking_uri: str) -> ArtifactRef | None:
    """The artifact an earlier run on this MLflow server logged for this cache entry, if it is still there."""
    record = final.with_name(final.name + ".published.json")
    entry = json.loads(record.read_text()).get(tracking_uri) if record.is_file() else None
    if not entry:
        return None
    ref = ArtifactRef.model_validate(entry)
    try:
        return ref if client.list_artifacts(ref.run_id, ref.path) else None
    except Exception:  # the run was deleted
        return None


def remember(final: Path, tracking_uri: str, ref: ArtifactRef) -> None:
    record = final.with_name(final.name + ".published.json")
    known = json.loads(record.read_text()) if record.is_file() else {}
    tmp = record.with_name(f".{record.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({**known, tracking_uri: ref.model_dump()}))
    tmp.replace(record)


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(cfg: TuneflowConfig, downloaded: DownloadResult, ctx: RunContext) -> PrepareResult:
    logger = get_run_logger()
    with ctx.stage("prepare") as (client, run_id):
        key = cache_key(cfg, downloaded)
        final = cache_root() / "prepared" / key
        log_params(client, run_id, {"cache_key": key})
        hit = (final / "stats.json").is_file()
        if hit:
            logger.info("prepare: reusing the tokenized dataset in %s (same inputs as an earlier run)", final)
            os.utime(final)  # last use, for `tuneflow cache prune`
        else:
            build_entry(cfg, downloaded, final, logger)
        stats = json.loads((final / "stats.json").read_text())
        ref = published(final, client, ctx.tracking_uri)
        if ref is None:
            ref = publish(client, run_id, final, "prepared")
            remember(final, ctx.tracking_uri, ref)
        else:
            register(ref.digest, final)
            logger.info("prepare: the same data is already logged as %s", ref.uri)
        log_params(client, run_id, {"data.uri": ref.uri, "data.digest": ref.digest})
        log_metrics(client, run_id, {k: v for k, v in stats.items() if isinstance(v, (int, float))})
        log_metrics(client, run_id, {f"mix.{i}.{k}": source[k] for i, source in enumerate(stats["mix"])
                                     for k in ("rows", "share")})
        logger.info("prepare: the training mix: %s", ", ".join(f"{s['name']} {s['rows']} rows ({s['share']:.0%})"
                                                                for s in stats["mix"]))
        client.log_dict(run_id, stats, "prepare_stats.json")
        client.set_tag(run_id, "cache_hit", str(hit).lower())
        return PrepareResult(data=ref, stats=stats, cache_hit=hit, mlflow_run_id=run_id)
