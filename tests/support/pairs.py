"""Preference pairs the tests train on."""

from __future__ import annotations

import json
from pathlib import Path


def write_pairs(path: Path, rows_file: Path) -> Path:
    """An instruction dataset's rows (alpaca JSON) as preference pairs in TRL's layout: each row's answer chosen
    over the previous row's."""
    rows = json.loads(Path(rows_file).read_text())
    path.write_text("".join(json.dumps({
        "prompt": r["instruction"] + (f"\n{r['input']}" if r.get("input") else ""), "chosen": r["output"],
        "rejected": rows[i - 1]["output"]}) + "\n" for i, r in enumerate(rows) if r["output"] != rows[i - 1]["output"]))
    return path
