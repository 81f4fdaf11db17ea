"""The local cache of stage outputs ($TUNEFLOW_CACHE) against a real `mlflow server`: it owns every entry it
serves, refetches what is missing or damaged, stays whole when several processes share it, and prunes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneflow.core.results import ArtifactRef
from tuneflow.tracking.artifacts import cache_root, digest, materialize, prune, publish

READER = """
import json, sys
from tuneflow.tracking.artifacts import digest, materialize
from tuneflow.core.results import ArtifactRef
ref = ArtifactRef.model_validate_json(sys.argv[1])
folder = materialize(ref, sys.argv[2])
print(json.dumps({"path": str(folder), "digest": digest(folder)}))
"""


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEFLOW_CACHE", str(tmp_path / "cache"))
    return cache_root()


def adapter(folder: Path, size: int = 1 << 20) -> Path:
    """A folder shaped like a stage's output: a few files, one in a subfolder."""
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (folder / "sub" / "notes.txt").write_text("checkpoint")
    return folder


def published(mlflow_server: str, folder: Path) -> ArtifactRef:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("cache") or client.get_experiment(client.create_experiment("cache"))
    run = client.create_run(experiment.experiment_id)
    return publish(client, run.info.run_id, folder, "adapter")


def test_the_cache_keeps_a_published_folder_after_the_writer_deletes_it(cache, mlflow_server, tmp_path):
    source = adapter(tmp_path / "flow-run" / "adapter")
    ref = published(mlflow_server, source)
    entry = materialize(ref, mlflow_server)
    assert entry.parent.parent == cache and not entry.is_symlink()
    # The worker deletes the flow run's folder when the run ends: the cache's entry is untouched.
    for file in sorted(source.rglob("*"), reverse=True):
        file.unlink() if file.is_file() else file.rmdir()
    assert materialize(ref, mlflow_server) == entry and digest(entry) == ref.digest
    assert json.loads((entry / "adapter_config.json").read_text()) == {"r": 8}


def test_a_damaged_or_dangling_entry_is_fetched_again_through_mlflow(cache, mlflow_server, tmp_path):
    ref = published(mlflow_server, adapter(tmp_path / "out"))
    entry = materialize(ref, mlflow_server)

    (entry / "adapter_model.safetensors").write_bytes(b"truncated")  # damaged in place
    assert digest(materialize(ref, mlflow_server)) == ref.digest

    (entry / "sub" / "notes.txt").unlink()  # half an entry
    assert digest(materialize(ref, mlflow_server)) == ref.digest

    # A pointer into a folder the cache does not own (as older versions registered) that has since gone.
    import shutil

    shutil.rmtree(entry)
    entry.symlink_to(tmp_path / "deleted-flow-run", target_is_directory=True)
    again = materialize(ref, mlflow_server)
    assert again == entry and not entry.is_symlink() and digest(entry) == ref.digest


def test_processes_sharing_one_cache_read_and_write_an_entry_at_once(cache, mlflow_server, tmp_path):
    ref = published(mlflow_server, adapter(tmp_path / "out", size=16 << 20))
    import shutil

    from tuneflow.tracking.artifacts import _entry

    shutil.rmtree(_entry(ref.digest))  # nothing cached: every reader downloads, all at once
    env = {**os.environ, "TUNEFLOW_CACHE": str(cache)}
    readers = [subprocess.Popen([sys.executable, "-c", READER, ref.model_dump_json(), mlflow_server], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = []
    for proc in readers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert {r["digest"] for r in results} == {ref.digest}
    assert len({r["path"] for r in results}) == 1
    assert [p.name for p in (cache / "artifacts").iterdir()] == [ref.digest.removeprefix("sha256:")]  # no leftovers


def test_prune_removes_what_no_run_used_lately(cache, mlflow_server, tmp_path):
    old = materialize(published(mlflow_server, adapter(tmp_path / "old")), mlflow_server)
    recent = materialize(published(mlflow_server, adapter(tmp_path / "recent")), mlflow_server)
    prepared = cache / "prepared" / "abc"
    prepared.mkdir(parents=True)
    (prepared / "stats.json").write_text("{}")
    (cache / "prepared" / "abc.published.json").write_text("{}")
    crashed = cache / "artifacts" / ".dead.1234.partial"  # left by a process killed mid-download
    crashed.mkdir()
    month_ago = time.time() - 30 * 86400
    for path in (old, prepared, crashed):
        os.utime(path, (month_ago, month_ago))

    done = subprocess.run([sys.executable, "-m", "tuneflow.cli.main", "cache", "prune", "--keep-days", "14",
                           "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "would remove 3 entries" in done.stdout and old.exists(), done.stdout

    pruned = prune(14)
    assert sorted(pruned.entries) == sorted([old, prepared, crashed]) and pruned.size > 1 << 20
    assert not old.exists() and not prepared.exists() and not crashed.exists()
    assert not (cache / "prepared" / "abc.published.json").exists()
    assert recent.is_dir()
