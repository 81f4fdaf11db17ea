"""Stage outputs as MLflow artifacts, and a local cache of them keyed by content digest.

`publish` logs a folder as an artifact of a stage's MLflow run and returns an `ArtifactRef` with the folder's
digest; the folder also enters this machine's cache as an entry of its own (hard links where the file system
allows, else a copy), so a later stage here reads it without a download even after the publishing stage's folder
is gone. `materialize` turns a reference into a local folder: the cache entry when its content still matches the
digest, else a fresh download through the MLflow tracking server. With an `mlflow server` that proxies artifacts, a
machine needs nothing but MLFLOW_TRACKING_URI to read them.

Every entry is built in a staging folder beside it, checked against its digest, then renamed into place, so a
reader sees a complete entry or none: two workers or two runs sharing one cache (one HOME) never half-read. The
cache lives in $TUNEFLOW_CACHE (default ~/.cache/tuneflow); `tuneflow cache prune --keep-days N` empties it of what
no run has used lately.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuneflow.core.files import cache_root, install, is_staging, staging_path
from tuneflow.core.results import ArtifactRef

CHUNK = 1 << 20
KINDS = ("artifacts", "models", "prepared")  # the cache's folders of entries


def digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, in name order."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _entry(value: str) -> Path:
    folder = cache_root() / "artifacts"
    folder.mkdir(exist_ok=True)
    return folder / value.removeprefix("sha256:")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _discard(path: Path) -> None:
    """Remove a cache entry: renamed away first (one atomic step for readers), then deleted."""
    trash = staging_path(path, unique=True)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    if trash.is_symlink() or trash.is_file():
        trash.unlink()
    else:
        shutil.rmtree(trash, ignore_errors=True)


def _install(staging: Path, entry: Path) -> None:
    """Rename a complete staging folder into place; when another process got there first, theirs is identical."""
    if entry.is_symlink():  # an entry of an older tuneflow: a pointer into a folder the cache did not own
        _discard(entry)
    install(staging, entry, keep_existing=True)


def _verified(entry: Path, value: str) -> bool:
    """The entry exists, is the cache's own folder and holds exactly the content of digest ``value``; a damaged
    one is discarded so that the caller fetches it again."""
    if entry.is_symlink():
        _discard(entry)
        return False
    if not entry.is_dir():
        return False
    if digest(entry) != value:
        _discard(entry)
        return False
    os.utime(entry)  # last use, for `tuneflow cache prune`
    return True


def register(value: str, folder: Path) -> Path:
    """Enter ``folder`` (of digest ``value``) into this machine's cache as an entry of its own; return the entry."""
    entry = _entry(value)
    if _verified(entry, value):
        return entry
    staging = staging_path(entry, unique=True)
    try:
        shutil.copytree(folder, staging, copy_function=_link_or_copy)
        found = digest(staging)
        if found != value:
            raise RuntimeError(f"{folder} changed while it was published ({found}, expected {value})")
        _install(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


def publish(client, run_id: str, folder: Path, name: str) -> ArtifactRef:
    """Log ``folder`` as artifact ``name`` of ``run_id``; return its reference."""
    value = digest(folder)
    client.log_artifacts(run_id, str(folder), name)
    register(value, folder)
    return ArtifactRef(run_id=run_id, path=name, digest=value)


def materialize(ref: ArtifactRef, tracking_uri: str) -> Path:
    """A local folder holding the artifact ``ref``: this machine's cache entry, else downloaded into it."""
    from mlflow.artifacts import download_artifacts

    entry = _entry(ref.digest)
    if _verified(entry, ref.digest):
        return entry
    staging = staging_path(entry, unique=True)
    try:
        download_artifacts(artifact_uri=ref.uri, dst_path=str(staging), tracking_uri=tracking_uri)
        got = staging / Path(ref.path).name
        found = digest(got)
        if found != ref.digest:
            raise RuntimeError(f"artifact {ref.uri}: content digest {found} does not match the reference "
                               f"{ref.digest}; it was changed after it was logged")
        _install(got, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry


@dataclass
class Pruned:
    entries: list[Path]
    size: int  # bytes of the files they held (hard-linked files may still be held elsewhere)


STAGING_GRACE_S = 3600  # a staging folder younger than this may belong to a download in progress


def prune(keep_days: float, dry_run: bool = False) -> Pruned:
    """Remove the cache entries (artifacts, models, prepared datasets) no run has used for ``keep_days`` days, and
    staging folders that crashed processes left. An entry is used when a stage publishes or reads it."""
    now = time.time()
    cutoff = now - keep_days * 86400
    root = cache_root()
    entries, size = [], 0
    for kind in KINDS:
        folder = root / kind
        for path in sorted(folder.iterdir()) if folder.is_dir() else ():
            if path.name.endswith(".published.json"):
                continue  # removed with its entry
            try:
                used = path.lstat().st_mtime
            except FileNotFoundError:
                continue
            staging = is_staging(path)
            if used >= (min(cutoff, now - STAGING_GRACE_S) if staging else cutoff):
                continue
            files = [path] if path.is_symlink() or path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            size += sum(p.lstat().st_size for p in files)
            entries.append(path)
            if not dry_run:
                _discard(path)
                path.with_name(path.name + ".published.json").unlink(missing_ok=True)
    return Pruned(entries, size)

