"""Stage 1 against a real Hub endpoint (olah): commit SHAs, reuse of the Hub cache, offline use of a complete
snapshot (and refusal of an incomplete one), and a Hub server killed in the middle of a download."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.servers import add_repo, start_olah, stop
from tuneflow.core.ports import free_port

pytestmark = pytest.mark.slow

DOWNLOAD = """
import json, logging, sys
from tasks.download import fetch_weights, pinned
from tuneflow.core.config import TuneflowConfig
from tuneflow.sources.hub import Problem
from tuneflow.sources.preflight import PreflightError, preflight

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
log = logging.getLogger("tuneflow")
log.setLevel(logging.INFO)
cfg = TuneflowConfig.model_validate({"model": {"name_or_path": sys.argv[1]},
                                     "dataset": {"name_or_path": sys.argv[2], "eval_size": 2}})
try:
    checked = preflight(cfg, log)
    folder = fetch_weights(checked.model, cfg, log)
    ref = pinned(checked.model, folder)
    print(json.dumps({**ref.model_dump(), "source": ref.source, "path": str(folder)}))
except (PreflightError, Problem) as exc:
    print(json.dumps({"error": str(exc)}))
"""


def download_env(endpoint: str, cache: Path, **extra) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**base, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}


def download(repo_id: str, data: Path, env: dict) -> tuple[dict, str]:
    """huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import: each case runs in its own process."""
    done = subprocess.run([sys.executable, "-c", DOWNLOAD, repo_id, str(data)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_hub_download_cache_reuse_and_offline(hub_mirror, tiny_assets, tmp_path):
    cache = tmp_path / "hub-cache"
    online, _ = download(hub_mirror.model_id, tiny_assets["data"], download_env(hub_mirror.endpoint, cache))
    assert online["revision"] == hub_mirror.model_sha and online["source"] == "hub"
    files = set(os.listdir(online["path"]))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files

    again, log = download(hub_mirror.model_id, tiny_assets["data"], download_env(hub_mirror.endpoint, cache))
    assert again == online
    assert f"model {hub_mirror.model_id}@{hub_mirror.model_sha}: all" in log and "nothing to download" in log, log

    # Offline, the complete cached snapshot is used without the network (the endpoint is unreachable).
    offline_env = download_env("http://127.0.0.1:9", cache, HF_HUB_OFFLINE="1")
    assert download(hub_mirror.model_id, tiny_assets["data"], offline_env)[0] == online

    # Offline with nothing cached: a clear error, at once (no retries).
    missing, _ = download(hub_mirror.model_id, tiny_assets["data"],
                          download_env("http://127.0.0.1:9", tmp_path / "empty-cache", HF_HUB_OFFLINE="1"))
    assert "HF_HUB_OFFLINE is set and the cache has no complete snapshot of revision 'main'" in missing["error"]

    # Offline with an incomplete snapshot (the weights never arrived): refused, not used.
    (Path(online["path"]) / "model.safetensors").unlink()
    partial, _ = download(hub_mirror.model_id, tiny_assets["data"], offline_env)
    assert "HF_HUB_OFFLINE is set and the cache has no complete snapshot" in partial["error"], partial
    assert "model.safetensors" in partial["error"], partial


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hub_killed_mid_download(tiny_assets, tmp_path):
    """SIGKILL the Hub server while weights stream in and keep it down: huggingface_hub's own quick resumes fail, and
    the download ends within 20 s in one line naming the endpoint, with no partial file in the snapshot. With the
    server back on the same port, the next download completes and every file is byte-identical to the repo's."""
    source = tmp_path / "big-model"
    shutil.copytree(tiny_assets["model"], source)
    for i in range(3):  # ~150 MB in all: several seconds through olah, so the kill lands mid-stream
        (source / f"extra-{i}.safetensors").write_bytes(os.urandom(48 * 2**20))
    sha = add_repo(tmp_path / "mirror", "model", "tiny-org/big", source)
    port, work = free_port(), tmp_path / "olah"
    work.mkdir()
    server = start_olah(tmp_path / "mirror", work, port)
    cache = tmp_path / "hub-cache"
    env = download_env(f"http://127.0.0.1:{port}", cache)
    client = subprocess.Popen([sys.executable, "-c", DOWNLOAD, "tiny-org/big", str(tiny_assets["data"])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        partial = []
        while not partial and time.monotonic() < deadline and client.poll() is None:
            partial = [p for p in cache.rglob("*.incomplete") if p.stat().st_size > 0]
            time.sleep(0.05)
        assert partial, "the download was never seen in progress"
        server.kill()  # the Hub goes away mid-stream, for good
        server.wait()
        killed = time.monotonic()
        out, err = client.communicate(timeout=120)
        waited = time.monotonic() - killed
        failed = json.loads(out.strip().splitlines()[-1])
        assert waited < 20, f"{waited:.0f} s to give up\n{err[-3000:]}"
        assert failed["error"].startswith(f"model tiny-org/big: the Hub at http://127.0.0.1:{port} cannot be reached")
        assert "HF_ENDPOINT" in failed["error"] and "\n" not in failed["error"], failed
        # Only complete files ever enter the snapshot.
        snapshot_files = list((cache / "models--tiny-org--big" / "snapshots").rglob("extra-*"))
        assert all(sha256(p) == sha256(source / p.name) for p in snapshot_files)

        server = start_olah(tmp_path / "mirror", work, port)  # back: the same download completes
        result, err = download("tiny-org/big", tiny_assets["data"], env)
    finally:
        client.kill()
        stop(server)
    assert result.get("revision") == sha, f"{result}\n{err[-3000:]}"
    snapshot = Path(result["path"])
    for file in sorted(source.glob("*.safetensors")):
        assert sha256(snapshot / file.name) == sha256(file), f"{file.name} differs from the repo's"
    assert not list(cache.rglob("*.incomplete")), "a partial download was left behind"


@pytest.mark.parametrize("command", ["plan", "validate"])
def test_an_unreachable_hub_is_named_in_one_line_within_seconds(command, tmp_path):
    """A closed port on loopback: no retries of a refused connection, one line naming the endpoint and what to set."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": {"name_or_path": "tiny-org/tiny-llama"},
                                  "dataset": {"name_or_path": "tiny-org/tiny-instruct"}}))
    args = ["--gpu-memory", "24GiB"] if command == "plan" else []
    started = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "tuneflow"), command, "--config", str(config), *args],
                          env=download_env(endpoint, tmp_path / "hub-cache"), capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stdout + done.stderr
    assert elapsed < 20, f"{elapsed:.0f} s\n{done.stderr}"
    line = f"model tiny-org/tiny-llama: the Hub at {endpoint} cannot be reached ([Errno 111] Connection refused)"
    problems = [text for text in done.stderr.splitlines() if line in text]
    assert len(problems) == 1 and "HF_ENDPOINT" in problems[0] and "HF_HUB_OFFLINE=1" in problems[0], done.stderr
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr, done.stderr
