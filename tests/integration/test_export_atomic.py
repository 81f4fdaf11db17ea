"""A kill in the middle of writing the export never leaves a half-written model at the export path; the next
attempt writes a complete one."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

WRITE = """
import os, signal, sys
from pathlib import Path
import transformers.modeling_utils as mu
from transformers import AutoModelForCausalLM, AutoTokenizer
from tasks.export import write_export

model_dir, final, kill = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "kill"
real_save, shards = mu.safe_save_file, []

def save_then_die(tensors, filename, metadata=None):  # SIGKILL right after the second shard is on disk
    real_save(tensors, filename, metadata=metadata)
    shards.append(filename)
    if kill and len(shards) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

mu.safe_save_file = save_then_die
model = AutoModelForCausalLM.from_pretrained(model_dir)
print(write_export(model, AutoTokenizer.from_pretrained(model_dir), "# card", final, "200KB"))
"""


def write(model_dir, final, mode):
    return subprocess.run([sys.executable, "-c", WRITE, str(model_dir), str(final), mode], capture_output=True,
                          text=True, timeout=300)


def test_export_killed_mid_write_is_never_visible(tiny_assets, tmp_path):
    final = tmp_path / "run" / "export"
    final.parent.mkdir()
    killed = write(tiny_assets["model"], final, "kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    staging = final.parent / ".export.partial"
    assert len(list(staging.glob("*.safetensors"))) == 2, "the kill did not land mid-write"
    assert not final.exists(), "a half-written export is visible at the export path"

    done = write(tiny_assets["model"], final, "complete")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not staging.exists()
    index = json.loads((final / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and shards == {p.name for p in final.glob("*.safetensors")}
    assert (final / "tokenizer.json").is_file() and (final / "README.md").read_text() == "# card"
