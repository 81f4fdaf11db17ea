"""Stage 1, download: pre-flight checks, then the model weights, from the Hugging Face Hub or a local path.

First `tuneflow.sources.preflight` fetches the repo listings, the model's small files and the dataset and checks them
all; only then come the weights. The result pins both: Hub repo + commit SHA, or a local path + content digest, which is
what a stage on another machine needs to find the same files (`tuneflow.sources.hub.fetch`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.results import DownloadResult
from tuneflow.sources.hub import Problem, Source, cached_fraction, model_patterns, pinned, snapshot
from tuneflow.sources.preflight import preflight
from tuneflow.tracking.context import RunContext
from tuneflow.tracking.runs import log_params


def fetch_weights(src: Source, cfg: TuneflowConfig, logger) -> Path:
    patterns = model_patterns(cfg)
    if src.sha and not src.registry:
        cached, wanted = cached_fraction(src, patterns)
        if cached == wanted:
            logger.info("model %s@%s: all %d files already in the Hub cache; nothing to download",
                        src.name, src.sha, wanted)
        else:
            logger.info("model %s@%s: downloading %d of %d files", src.name, src.sha, wanted - cached, wanted)
    folder = snapshot(src, patterns, logger)
    if src.local is None and not any(folder.glob("*.safetensors")):
        raise Problem(f"model {src.name}: no .safetensors weights in {folder}")
    return folder


@task(name="download", cache_policy=NO_CACHE)
def download(cfg: TuneflowConfig, ctx: RunContext) -> DownloadResult:
    logger = get_run_logger()
    with ctx.stage("download") as (client, run_id):
        checked = preflight(cfg, logger, ctx.tracking_uri)
        names = ", ".join(source.name_or_path for _, source in cfg.all_sources)
        logger.info("pre-flight checks passed: model %s, datasets %s", cfg.model.name_or_path, names)
        refs = {"model": pinned(checked.model, fetch_weights(checked.model, cfg, logger))}
        for (key, _), found, folder in zip(cfg.all_sources, checked.datasets, checked.dataset_dirs, strict=True):
            refs[key] = pinned(found, folder)
        for key, ref in refs.items():
            logger.info("%s %s@%s", key, ref.name, ref.revision)
        log_params(client, run_id, {f"{key}.{k}": v for key, ref in refs.items()
                                    for k, v in (("name", ref.name), ("revision", ref.revision),
                                                 ("source", ref.source))})
        return DownloadResult(model=refs["model"], datasets=[refs[key] for key, _ in cfg.sources],
                              eval_dataset=refs.get("eval_dataset"), mlflow_run_id=run_id)
