"""Hugging Face Hub access: resolve a repo to a commit, download from it with retries, and find it again later.

Everything goes through `huggingface_hub`, so HF_ENDPOINT (a mirror), HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE work
as everywhere else. Files land in the Hub cache one by one through a temporary name, so a download cut short is
resumed, never used. A stage on another machine finds a model or dataset again by its commit SHA (`fetch`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.config import tracking_uri as core_tracking_uri
from tuneflow.core.errors import TuneflowError
from tuneflow.core.results import SourceRef
from tuneflow.data.formats import DATA_SUFFIXES
from tuneflow.sources.registered import RegisteredModelProblem, is_registered, model_folder, resolve

# What loading a model needs: configs, tokenizer files, chat templates; weights (safetensors only) come last.
MODEL_SMALL_FILES = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
WEIGHTS = ["*.safetensors"]
DATASET_PATTERNS = [f"{prefix}*{suffix}" for prefix in ("", "**/") for suffix in DATA_SUFFIXES]
RETRY_WAIT = (2, 30)  # seconds: the first wait, doubling up to the last
RETRY_WITHIN_S = 120  # transient failures are retried for this long
FULL_HASH_LIMIT = 64 * 2**20


class Problem(TuneflowError):
    """One thing that stops the run, worded for the user."""


class RepoNotFound(Problem):
    pass


@dataclass
class Source:
    """A model or dataset: a local path, or a Hub repo at a resolved commit with its file listing."""

    key: str  # "model" or "dataset": the config section
    name: str
    revision: str
    local: Path | None = None
    sha: str | None = None  # None when offline: the cache decides
    files: list[str] = field(default_factory=list)
    token: str | None = field(default=None, repr=False)  # None: huggingface_hub's own (HF_TOKEN, hf auth login)
    registry: str | None = None  # a model logged to MLflow (models:/…, sha its model id): the tracking URI

    @property
    def repo_type(self) -> str:
        return self.key


def model_patterns(cfg: TuneflowConfig) -> list[str]:
    # Python files only when the config trusts the repo's code (and then pins its revision).
    return MODEL_SMALL_FILES + WEIGHTS + (["*.py"] if cfg.model.trust_remote_code else [])


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def unreachable(exc: BaseException) -> str | None:
    """Why no connection could be made at all (refused, a host name that does not resolve), found in ``exc`` or
    what caused it; None for anything else."""
    import socket

    import httpx2  # huggingface_hub's HTTP client

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, (httpx2.ConnectError, ConnectionRefusedError, socket.gaierror)):
            return str(seen).splitlines()[0] if str(seen) else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None


def transient(exc: BaseException) -> bool:
    """Worth another try: a timeout, a connection cut mid-answer, a 5xx, 429 or 408 from the Hub."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 500
        return status >= 500 or status in (408, 429)
    return isinstance(exc, (httpx2.TimeoutException, httpx2.RemoteProtocolError, httpx2.ReadError))


def hub_call(fn, src: Source, logger: logging.Logger, retry: bool = True):
    """Call the Hub; turn its refusals and an unreachable endpoint into one-line Problems at once.

    One retry policy per request: with ``retry``, for metadata calls that huggingface_hub does not retry itself
    (repo_info), transient failures are retried here with backoff (RETRY_WAIT); downloads pass ``retry=False``, since
    huggingface_hub already retries their requests and resumes their streams. A refused connection or a name that
    does not resolve is never retried: the run is told within seconds what to set."""
    import tenacity
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{src.key} {src.name}"

    def warn(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception()
        logger.warning("%s: Hub request failed (%s); retry %d in %.0fs", what, str(error).splitlines()[0],
                       state.attempt_number, state.upcoming_sleep)

    policy = tenacity.Retrying(
        retry=tenacity.retry_if_exception(lambda exc: retry and not offline() and transient(exc)),
        wait=tenacity.wait_exponential(multiplier=RETRY_WAIT[0], max=RETRY_WAIT[1]),
        stop=tenacity.stop_after_delay(RETRY_WITHIN_S), before_sleep=warn, reraise=True)
    try:
        return policy(fn)
    except GatedRepoError:
        raise Problem(f"{src.key}.name_or_path: {src.name} is gated; accept its terms on the Hub, then set "
                      "HF_TOKEN (or hub.token_secret) to a token of that account") from None
    except RevisionNotFoundError:
        raise Problem(f"{src.key}.revision: {src.revision!r} is not a branch, tag or commit of {src.name}") from None
    except RepositoryNotFoundError:
        raise RepoNotFound(f"{src.key}.name_or_path: {src.name} is neither a local path nor a repo on the Hub "
                           f"({src.repo_type}s); check the name, or set HF_TOKEN if it is private") from None
    except Exception as exc:
        if isinstance(exc, LocalEntryNotFoundError) and offline():
            raise Problem(f"{what}: HF_HUB_OFFLINE is set and the cache has no complete snapshot of revision "
                          f"{src.revision!r}: {str(exc).splitlines()[0]}") from None
        if reason := unreachable(exc):
            raise Problem(f"{what}: the Hub at {endpoint()} cannot be reached ({reason}); check the network, set "
                          "HF_ENDPOINT to a mirror you can reach, or HF_HUB_OFFLINE=1 to use only what the Hub cache "
                          "holds") from None
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise Problem(f"{what}: the Hub at {endpoint()} refused the token ({status}); set HF_TOKEN (or "
                              "hub.token_secret) to a token with access to this repo") from None
            kind = "failed" if transient(exc) else "refused the request"
            raise Problem(f"{what}: the Hub at {endpoint()} {kind}: {str(exc).splitlines()[0]}") from None
        if transient(exc) or isinstance(exc, LocalEntryNotFoundError):
            raise Problem(f"{what}: the Hub at {endpoint()} did not answer: {str(exc).splitlines()[0]}") from None
        raise


def unsafe_names(files: list[str]) -> list[str]:
    """Repo file names that would land outside the snapshot folder: absolute, '..' or backslash paths."""
    return [f for f in files if f.startswith("/") or "\\" in f or ".." in PurePosixPath(f).parts]


def has_main(api, name: str, repo_type: str) -> bool:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(name, repo_type=repo_type, revision="main")
    except RepositoryNotFoundError:
        return False
    return True


def from_mlflow(fn, *args):
    """A call of tuneflow.sources.registered, its problem said as this module's Problem (one line, with the others)."""
    try:
        return fn(*args)
    except RegisteredModelProblem as exc:
        raise Problem(str(exc)) from None


def locate(name_or_path: str, revision: str, key: str, logger: logging.Logger, token: str | None = None,
           tracking_uri: str | None = None) -> Source:
    """A local path as it is; a Hub repo resolved to a commit SHA with its file listing; a model logged to MLflow
    (models:/…, at ``tracking_uri``, else MLFLOW_TRACKING_URI) resolved to its model id. Nothing is downloaded."""
    if is_registered(name_or_path):
        if key != "model":
            raise Problem(f"{key}.name_or_path: {name_or_path} names an MLflow model; a {key} is a local path or a "
                          "Hub repo")
        uri = tracking_uri or core_tracking_uri(None)
        return Source(key, name_or_path, revision, sha=from_mlflow(resolve, name_or_path, uri), registry=uri)
    local = Path(name_or_path).expanduser()
    if local.exists():
        return Source(key, name_or_path, revision, local=local.resolve())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.endswith(DATA_SUFFIXES):
        raise Problem(f"{key}.name_or_path: no such file or folder: {name_or_path}")
    src = Source(key, name_or_path, revision, token=token)
    if offline():
        return src
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        info = hub_call(lambda: api.repo_info(name_or_path, repo_type=key, revision=revision), src, logger)
    except RepoNotFound:
        # Some Hub servers (mirrors) answer an unknown revision as an unknown repo: tell the two apart.
        if revision != "main" and has_main(api, name_or_path, key):
            raise Problem(f"{key}.revision: {revision!r} is not a branch, tag or commit of {name_or_path}") from None
        raise
    src.sha, src.files = info.sha, sorted(s.rfilename for s in info.siblings or [])
    unsafe = unsafe_names(src.files)
    if unsafe:
        raise Problem(f"{key}.name_or_path: {name_or_path} lists file names that leave the repo folder: {unsafe[:3]}")
    return src


def rekey(problem: Problem, kind: str, name_key: str, revision_key: str) -> str:
    """A Problem worded for ``kind``.name_or_path / ``kind``.revision, said of the keys that named the source
    (e.g. eval.judge.model), so that the user knows which setting to change."""
    said = str(problem)
    for old, new in ((f"{kind}.name_or_path:", f"{name_key}:"), (f"{kind}.revision:", f"{revision_key}:")):
        if said.startswith(old):
            return new + said[len(old):]
    return f"{name_key}: {said}"


def snapshot(src: Source, patterns: list[str], logger: logging.Logger) -> Path:
    """The files matching ``patterns`` from the Hub cache, downloading what it lacks (atomically, per file)."""
    if src.local is not None:
        return src.local
    if src.registry:
        return from_mlflow(model_folder, src.sha, src.registry)  # the logged model is one download: weights included
    from huggingface_hub import snapshot_download

    folder = Path(hub_call(lambda: snapshot_download(src.name, repo_type=src.repo_type, revision=src.revision,
                                                     allow_patterns=patterns, token=src.token), src, logger,
                           retry=False))
    if src.sha and folder.name != src.sha:
        raise Problem(f"{src.key} {src.name}: revision {src.revision!r} moved from {src.sha} to {folder.name} "
                      f"during the download; run again, or pin {src.key}.revision to a commit")
    return folder


def cached_fraction(src: Source, patterns: list[str]) -> tuple[int, int]:
    """(files already in the Hub cache, files wanted) for the Hub files matching ``patterns``."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    wanted = list(filter_repo_objects(src.files, allow_patterns=patterns))
    cached = sum(isinstance(try_to_load_from_cache(src.name, f, revision=src.sha, repo_type=src.repo_type), str)
                 for f in wanted)
    return cached, len(wanted)


def secret(name: str, key: str) -> str:
    """The value of the Prefect Secret block ``name``, which config key ``key`` names; a missing block is a Problem."""
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except ValueError:
        raise Problem(f"{key}: there is no Prefect Secret block named {name!r}; create it in the Prefect UI "
                      "(Blocks > Secret) or with Secret(value=...).save(name)") from None


def hub_token(cfg: TuneflowConfig) -> str | None:
    """The token from the Prefect Secret block named by hub.token_secret; None leaves it to huggingface_hub."""
    return secret(cfg.hub.token_secret, "hub.token_secret") if cfg.hub.token_secret else None


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


def pinned(src: Source, folder: Path) -> SourceRef:
    """What a stage on another machine needs to find the same files: the Hub repo at the snapshot's commit, or the
    local path at a content digest; a model logged to MLflow at its model id."""
    if src.local is not None:
        return SourceRef(kind=src.key, name=src.name, revision=local_revision(folder), local_path=str(folder))
    if src.registry:
        return SourceRef(kind=src.key, name=src.name, revision=src.sha)
    return SourceRef(kind=src.key, name=src.name, revision=folder.name)  # snapshots/<commit sha>


def fetch(ref: SourceRef, cfg: TuneflowConfig, logger: logging.Logger, weights: bool = True,
          tracking_uri: str | None = None) -> Path:
    """The local folder of a pinned model or dataset on this machine: the Hub cache at the recorded commit
    (downloading what it lacks), the logged model from MLflow (tracking.uri), or the local path, which must exist
    here too (``tracking_uri``: the MLflow server this machine reaches, else tracking.uri's)."""
    if is_registered(ref.name):
        return from_mlflow(model_folder, ref.revision, tracking_uri or core_tracking_uri(cfg.tracking.uri))
    if ref.local_path:
        path = Path(ref.local_path)
        if not path.exists():
            raise Problem(f"{ref.kind}.name_or_path: {ref.name} is a local path of the machine that ran the download "
                          f"stage and does not exist here ({path}); put it on the Hub (or a mirror) for team runs")
        return path
    patterns = DATASET_PATTERNS if ref.kind == "dataset" else [
        p for p in model_patterns(cfg) if weights or p not in WEIGHTS]
    src = Source(ref.kind, ref.name, ref.revision, sha=ref.revision, token=hub_token(cfg))
    return snapshot(src, patterns, logger)
