"""The base of every config section, and sizes such as '2GB'."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 bytes (the units transformers' ``max_shard_size`` understands)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as '2GB', '500MB' or '200KB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
