"""Stage outputs as MLflow artifacts, and a local cache of them keyed by content digest.

`publish` logs a folder as an artifact of a stage's MLflow run and returns an `ArtifactRef` with the folder's
digest; the folder is also registered in this machine's cache, so a later stage here reads it in place, without a
copy. `materialize` turns a reference into a local folder: the registered one, an earlier download, or a fresh
download through the MLflow tracking server (into a temporary folder, digest checked, then renamed). With an
`mlflow server` that proxies artifacts, a machine needs nothing but MLFLOW_TRACKING_URI to read them.

The cache lives in $TUNEFLOW_CACHE (default ~/.cache/tuneflow).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from tuneflow.results import ArtifactRef

CHUNK = 1 << 20


def cache_root() -> Path:
    root = Path(os.environ.get("TUNEFLOW_CACHE") or Path.home() / ".cache" / "tuneflow").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


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


def register(value: str, folder: Path) -> None:
    """Let later stages on this machine read ``folder`` in place for artifacts of digest ``value``."""
    entry = _entry(value)
    if entry.is_dir():
        return
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.link")
    tmp.symlink_to(Path(folder).resolve(), target_is_directory=True)
    os.replace(tmp, entry)


def publish(client, run_id: str, folder: Path, name: str) -> ArtifactRef:
    """Log ``folder`` as artifact ``name`` of ``run_id``; return its reference."""
    value = digest(folder)
    client.log_artifacts(run_id, str(folder), name)
    register(value, folder)
    return ArtifactRef(run_id=run_id, path=name, digest=value)


def materialize(ref: ArtifactRef, tracking_uri: str) -> Path:
    """A local folder holding the artifact ``ref``: reused from this machine's cache, else downloaded."""
    from mlflow.artifacts import download_artifacts

    entry = _entry(ref.digest)
    if entry.is_dir():
        return entry.resolve()
    if entry.is_symlink():
        entry.unlink(missing_ok=True)  # registered folder deleted since: download instead
    staging = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        download_artifacts(artifact_uri=ref.uri, dst_path=str(staging), tracking_uri=tracking_uri)
        got = staging / Path(ref.path).name
        found = digest(got)
        if found != ref.digest:
            raise RuntimeError(f"artifact {ref.uri}: content digest {found} does not match the reference "
                               f"{ref.digest}; it was changed after it was logged")
        try:
            got.rename(entry)
        except OSError:  # another process finished the same download first: theirs is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry.resolve()


def materialize_model(uri: str, tracking_uri: str) -> Path:
    """A local Hugging Face folder (weights, config, tokenizer) of an MLflow model logged by the export stage:
    ``models:/<model_id>``, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``. Downloaded once per model
    (into a temporary folder, then renamed), reused after."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    target = uri.removeprefix("models:/").strip("/")
    client = MlflowClient(tracking_uri)
    if "@" in target or "/" in target:
        version = (client.get_model_version_by_alias(*target.split("@", 1)) if "@" in target
                   else client.get_model_version(*target.split("/", 1)))
        model_id = version.model_id or (version.source.removeprefix("models:/")
                                        if version.source.startswith("models:/m-") else None)
    else:
        model_id = target
    if not model_id:
        raise ValueError(f"{uri}: this registered version does not point to a logged model (registered by hand?)")
    entry = cache_root() / "models" / model_id
    if entry.is_dir():
        return entry
    entry.parent.mkdir(exist_ok=True)
    staging = entry.with_name(f".{model_id}.{uuid.uuid4().hex[:8]}.partial")
    try:
        location = client.get_logged_model(model_id).artifact_location  # e.g. mlflow-artifacts:/… (proxied)
        got = Path(download_artifacts(artifact_uri=location, dst_path=str(staging / "dl"), tracking_uri=tracking_uri))
        folder = staging / "hf"
        shutil.move(got / "model", folder)  # the flavour's layout: model/ and components/tokenizer/
        for file in (got / "components" / "tokenizer").iterdir():
            shutil.move(file, folder / file.name)
        try:
            folder.rename(entry)
        except OSError:  # another process finished the same download first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry
