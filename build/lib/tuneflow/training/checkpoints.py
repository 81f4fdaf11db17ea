"""Checkpoints that count: a checkpoint is used for resume, kept or uploaded only once every rank has written it.

After every rank returns from writing checkpoint-N, rank 0 checks the adapter and writes the marker
checkpoint-N/tuneflow-complete atomically; only then are older checkpoints pruned.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from tuneflow.core.files import install, remove, staged, staging_path

COMPLETE = "tuneflow-complete"  # written into checkpoint-N once every rank has finished writing it


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that every rank finished writing. One without the marker (a save cut short by a
    kill, or a rank still writing its optimizer shard when rank 0 wrote trainer_state.json) is never used."""
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return max(done, key=checkpoint_step, default=None)


def verify_adapter(folder: Path) -> None:
    """Refuse an adapter written empty (the ZeRO-3 gather bug) or with NaN/inf weights (a diverged run)."""
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        return  # full / freeze: no adapter
    from safetensors.torch import load_file

    tensors = load_file(file)
    empty = [k for k, t in tensors.items() if t.numel() == 0]
    bad = [k for k, t in tensors.items() if t.numel() and not bool(t.float().isfinite().all())]
    if not tensors or empty:
        raise RuntimeError(f"{file}: the adapter was written empty ({len(empty)} of {len(tensors)} tensors)")
    if bad:
        raise RuntimeError(f"{file}: {len(bad)} adapter tensors hold NaN or inf (e.g. {bad[0]}): training "
                           "diverged; lower train.learning_rate or use bf16")


def commit_checkpoint(folder: Path, keep: int) -> None:
    """Check the adapter, mark ``folder`` complete (atomically), then delete older checkpoints beyond ``keep``
    and any incomplete ones: the newest complete checkpoint is never deleted before its successor is marked."""
    verify_adapter(folder)
    with staged(folder / COMPLETE) as marker:
        marker.write_text(str(checkpoint_step(folder)))
    others = sorted((p for p in folder.parent.glob("checkpoint-*") if p != folder), key=checkpoint_step)
    complete = [p for p in others if (p / COMPLETE).is_file()]
    stale = complete[: max(0, len(complete) - (keep - 1))] + [p for p in others if p not in complete]
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)


def _artifact_dir(step: int) -> str:
    return f"checkpoints/checkpoint-{step}"


class CheckpointUploader:
    """Rank 0 uploads every checkpoint, once marked complete, to the stage's MLflow run, so that a training attempt
    restarted on another machine resumes from it. Uploads run on a background thread from a hard-linked snapshot
    (pruning may delete the checkpoint meanwhile); training never waits for them, except at the very end. The
    marker is uploaded last: a checkpoint cut short in upload is never restored."""

    def __init__(self, run_id: str, log):
        from concurrent.futures import ThreadPoolExecutor

        from mlflow import MlflowClient

        self.client, self.run_id, self.log = MlflowClient(), run_id, log
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self.pending = []

    def submit(self, folder: Path) -> None:
        snapshot = folder.parent.parent / ".uploads" / folder.name
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(folder, snapshot / "files", copy_function=os.link, ignore=shutil.ignore_patterns(COMPLETE))
        os.link(folder / COMPLETE, snapshot / COMPLETE)
        self.pending.append(self.pool.submit(self._upload, snapshot, checkpoint_step(folder)))

    def _upload(self, snapshot: Path, step: int) -> None:
        start = time.perf_counter()
        self.client.log_artifacts(self.run_id, str(snapshot / "files"), _artifact_dir(step))
        self.client.log_artifact(self.run_id, str(snapshot / COMPLETE), _artifact_dir(step))
        shutil.rmtree(snapshot, ignore_errors=True)
        self.log(f"uploaded checkpoint-{step} to MLflow in {time.perf_counter() - start:.1f}s")

    def close(self) -> None:
        """Wait for the uploads still running; an upload that failed is reported, not raised (training is done)."""
        for future in self.pending:
            if future.exception() is not None:
                self.log(f"warning: a checkpoint upload failed: {future.exception()}")
        self.pool.shutdown(wait=True)


def restore_checkpoint(client, run_id: str, tracking_uri: str, folder: Path) -> int | None:
    """Download the newest checkpoint uploaded complete to the MLflow run into ``folder``, unless this machine
    already holds one as new. Returns the step restored, or None."""
    from mlflow.artifacts import download_artifacts

    remote = sorted((checkpoint_step(Path(a.path)) for a in client.list_artifacts(run_id, "checkpoints") if a.is_dir),
                    reverse=True)
    local = last_complete_checkpoint(folder) if folder.is_dir() else None
    for step in remote:
        if local is not None and checkpoint_step(local) >= step:
            return None
        if COMPLETE not in {Path(a.path).name for a in client.list_artifacts(run_id, _artifact_dir(step))}:
            continue  # its upload was cut short
        target = folder / f"checkpoint-{step}"
        staging = staging_path(target)
        remove(staging)
        try:  # the download lands in staging/checkpoint-<step>
            download_artifacts(run_id=run_id, artifact_path=_artifact_dir(step), dst_path=str(staging),
                               tracking_uri=tracking_uri)
            install(staging / target.name, target)
        finally:
            remove(staging)
        return step
    return None
