"""Stage 1, download: the base model and the dataset, from the Hugging Face Hub or a local path.

Hub access is `huggingface_hub.snapshot_download`, so HF_ENDPOINT (a mirror), HF_TOKEN, HF_HUB_CACHE and
HF_HUB_OFFLINE work as everywhere else; the snapshot's commit SHA is recorded. Local paths are hashed instead.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.context import RunContext
from tuneflow.config import TuneflowConfig
from tuneflow.tracking import log_params

# Only what loading needs: safetensors weights, configs, tokenizer files, chat templates.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
DATASET_PATTERNS = ["*.json", "*.jsonl", "*.parquet", "*.csv", "**/*.json", "**/*.jsonl", "**/*.parquet", "**/*.csv"]
RETRY_DELAYS = (2, 5, 15, 30)
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


def fetch(name_or_path: str, revision: str, repo_type: str, allow_patterns: list[str], logger) -> Fetched:
    local = Path(name_or_path).expanduser()
    if local.exists():
        logger.info("%s: using local path %s", repo_type, local)
        return Fetched(path=str(local.resolve()), revision=local_revision(local), source="local")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from huggingface_hub import constants

    delays = () if constants.HF_HUB_OFFLINE else RETRY_DELAYS  # offline: the cache has it or it does not
    for attempt, delay in enumerate((*delays, None), 1):
        try:
            folder = snapshot_download(
                repo_id=name_or_path, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns
            )
            break
        except GatedRepoError:
            raise RuntimeError(
                f"{repo_type} {name_or_path} is gated: accept its terms on the Hub and set HF_TOKEN"
            ) from None
        except RevisionNotFoundError:
            raise RuntimeError(f"{repo_type} {name_or_path}: revision {revision!r} not found") from None
        except RepositoryNotFoundError:
            raise RuntimeError(
                f"{repo_type} {name_or_path} not found on the Hub (nor as a local path); check the name, "
                "or set HF_TOKEN if it is private"
            ) from None
        except Exception as exc:  # network errors, a server that went away, a 5xx: retry with backoff
            if not delays:
                raise RuntimeError(f"{repo_type} {name_or_path}: HF_HUB_OFFLINE is set and the cache has no "
                                   f"complete snapshot of revision {revision!r}: {exc}") from exc
            if delay is None:
                raise RuntimeError(f"{repo_type} {name_or_path}: download failed after {attempt} attempts: {exc}") from exc
            logger.warning("%s %s: download failed (%s); retry %d in %ss", repo_type, name_or_path, exc, attempt, delay)
        time.sleep(delay)
    sha = Path(folder).name  # snapshots/<commit sha>
    logger.info("%s %s@%s -> %s", repo_type, name_or_path, sha, folder)
    return Fetched(path=folder, revision=sha, source="hub")


@task(name="download", cache_policy=NO_CACHE)
def download(cfg: TuneflowConfig, ctx: RunContext) -> DownloadResult:
    logger = get_run_logger()
    with ctx.stage("download") as (client, run_id):
        # Python files only when the config trusts the repo's code (and then pins its revision).
        patterns = MODEL_PATTERNS + ["*.py"] if cfg.model.trust_remote_code else MODEL_PATTERNS
        model = fetch(cfg.model.name_or_path, cfg.model.revision, "model", patterns, logger)
        if not any(Path(model.path).glob("*.safetensors")):
            raise RuntimeError(f"model {cfg.model.name_or_path}: no .safetensors weights in {model.path}")
        dataset = fetch(cfg.dataset.name_or_path, cfg.dataset.revision, "dataset", DATASET_PATTERNS, logger)
        log_params(client, run_id, {
            "model.path": model.path, "model.revision": model.revision, "model.source": model.source,
            "dataset.path": dataset.path, "dataset.revision": dataset.revision, "dataset.source": dataset.source,
        })
        return DownloadResult(model=model, dataset=dataset, mlflow_run_id=run_id)
