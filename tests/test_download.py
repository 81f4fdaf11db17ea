"""Stage 1 against a real Hub endpoint (the olah mirror): commit SHAs, allow_patterns, offline use of the cache."""

import json
import os
import subprocess
import sys

import pytest

FETCH = """
import json, logging, sys
from tasks.download import MODEL_PATTERNS, fetch
try:
    got = fetch(sys.argv[1], "main", "model", MODEL_PATTERNS, logging.getLogger("test"))
    print(json.dumps(got.model_dump()))
except RuntimeError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def fetch_in_subprocess(repo_id: str, env: dict) -> dict:
    """huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import: each case runs in its own process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    done = subprocess.run([sys.executable, "-c", FETCH, repo_id], env={**base, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_hub_download_then_offline_from_cache(hub_mirror, tmp_path):
    cache = str(tmp_path / "hub-cache")
    online = fetch_in_subprocess(hub_mirror.model_id, {"HF_ENDPOINT": hub_mirror.endpoint, "HF_HUB_CACHE": cache})
    assert online["revision"] == hub_mirror.model_sha and online["source"] == "hub"
    files = {p for p in os.listdir(online["path"])}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files

    # Offline, the complete cached snapshot is used without the network (the endpoint is unreachable).
    offline = fetch_in_subprocess(hub_mirror.model_id, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": cache,
                                                        "HF_HUB_OFFLINE": "1"})
    assert offline == online

    # Offline with nothing cached: a clear error, at once (no retries).
    missing = fetch_in_subprocess(hub_mirror.model_id, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1",
                                                        "HF_HUB_CACHE": str(tmp_path / "empty-cache")})
    assert "HF_HUB_OFFLINE is set and the cache has no complete snapshot of revision 'main'" in missing.get(
        "error", ""), missing


@pytest.mark.slow
def test_unknown_repo_is_a_clear_error(hub_mirror, tmp_path):
    got = fetch_in_subprocess("tiny-org/no-such-model", {"HF_ENDPOINT": hub_mirror.endpoint,
                                                         "HF_HUB_CACHE": str(tmp_path / "c")})
    assert "tiny-org/no-such-model" in got.get("error", "") and "not found" in got["error"], got
