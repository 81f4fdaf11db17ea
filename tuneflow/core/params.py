"""A config as the runs record it: flat dotted params for MLflow, and the hash of the settings that change the
trained model (what `tuneflow retrain` compares to know whether anything changed)."""

from __future__ import annotations

import json
import re

from pydantic import BaseModel

from tuneflow.core.config import TuneflowConfig


def flatten(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """Dotted key -> string value, for MLflow params."""
    out: dict[str, str] = {}
    for name, value in cfg:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, key + "."))
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, entry in enumerate(value):  # datasets.0.weight, eval.benchmarks.1.task
                out.update(flatten(entry, f"{key}.{i}."))
        else:
            out[key] = json.dumps(value, default=lambda v: v.model_dump()) if isinstance(value, (list, dict)) else \
                str(value)  # a dict may hold sections (sweep.space's ranges)
    return out


# What does not change the trained model: names, folders, where things are logged, how failures and checkpoints
# are handled, where processes meet. Every other key (new ones included) is part of the config hash.
NOT_IN_CONFIG_HASH = (
    "run_name", "output_dir", "tracking", "registry", "sweep", "hub", "eval", "model.revision", "dataset.revision",
    "datasets.*.revision", "eval_dataset.revision",
    "model.attn_implementation",  # the kernel, not the result (as train.precision's machine-dependent choice)
    "export.max_shard_size", "export.device", "export.parity_samples", "export.enabled",
    "train.retries", "train.timeout_hours", "train.save_steps", "train.save_total_limit", "train.logging_steps",
    "train.gpu_memory", "train.master_port", "train.join_timeout",
)


def config_hash(cfg: TuneflowConfig) -> str:
    """sha256 over the settings that change the trained model (the revisions are pinned separately, by commit)."""
    import hashlib

    def excluded(key: str) -> bool:
        pattern = re.sub(r"\.\d+\.", ".*.", key)  # datasets.1.revision -> datasets.*.revision
        return any(k == x or k.startswith(x + ".") for x in NOT_IN_CONFIG_HASH for k in (key, pattern))

    kept = {k: v for k, v in flatten(cfg).items() if not excluded(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
