"""Stage 1, download: pre-flight checks, then the model weights, from the Hugging Face Hub or a local path.

Hub access is `huggingface_hub`, so HF_ENDPOINT (a mirror), HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE work as
everywhere else. First `tuneflow.preflight` fetches the repo listings, the model's small files and the dataset and
checks them all; only then come the weights. The commit SHAs are recorded (a content hash for local paths).
Files land in the Hub cache one by one through a temporary name, so a download cut short is resumed, never used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.context import RunContext
from tuneflow.config import TuneflowConfig
from tuneflow.preflight import Problem, Source, cached_fraction, model_patterns, preflight, snapshot
from tuneflow.tracking import log_params

FULL_HASH_LIMIT = 64 * 2**20


class Fetched(BaseModel):
    path: str
    revision: str  # Hub commit SHA, or "sha256:<digest>" of a local path
    source: str  # "hub" or "local"


class DownloadResult(BaseModel):
    model: Fetched
    dataset: Fetched
    mlflow_run_id: str


def local_revision(path: Path) -> str:
    """A content hash of a local file or folder (large files by name, size and mtime, to stay fast)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts)
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        stat = file.stat()
        if stat.st_size <= FULL_HASH_LIMIT:
            digest.update(file.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "sha256:" + digest.hexdigest()


def fetched(src: Source, folder: Path) -> Fetched:
    if src.local is not None:
        return Fetched(path=str(folder), revision=local_revision(folder), source="local")
    return Fetched(path=str(folder), revision=folder.name, source="hub")  # snapshots/<commit sha>


def fetch_weights(src: Source, cfg: TuneflowConfig, logger) -> Path:
    patterns = model_patterns(cfg)
    if src.sha:
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
        checked = preflight(cfg, logger)
        logger.info("pre-flight checks passed: model %s, dataset %s", cfg.model.name_or_path, cfg.dataset.name_or_path)
        model = fetched(checked.model, fetch_weights(checked.model, cfg, logger))
        dataset = fetched(checked.dataset, checked.dataset_dir)
        logger.info("model %s -> %s; dataset %s -> %s", model.revision, model.path, dataset.revision, dataset.path)
        log_params(client, run_id, {
            "model.path": model.path, "model.revision": model.revision, "model.source": model.source,
            "dataset.path": dataset.path, "dataset.revision": dataset.revision, "dataset.source": dataset.source,
        })
        return DownloadResult(model=model, dataset=dataset, mlflow_run_id=run_id)
