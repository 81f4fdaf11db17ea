"""Tiny multiple-choice sets in MMLU's layout (question, choices, answer), as a team writes them."""

from __future__ import annotations

import json
from pathlib import Path


def questions(n: int = 12, letters: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        choices = [str(a + b), str(a + b + 1), str(a * b + 3), str(abs(a - b))]
        answer = (i * 3) % 4
        choices[0], choices[answer] = choices[answer], choices[0]
        rows.append({"question": f"What is {a} plus {b}?", "choices": choices,
                     "answer": "ABCD"[answer] if letters else answer})
    return rows


def write_jsonl(rows: list, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hub_folder(folder: Path, n: int = 12) -> Path:
    """A dataset repo as the Hub lays one out: data/test-00000-of-00001.parquet (and a train split beside it)."""
    import pandas as pd

    (folder / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(questions(n)).to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    pd.DataFrame(questions(4, letters=True)).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    return folder
