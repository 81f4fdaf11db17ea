"""A team's own multiple-choice set, in MMLU's layout: each row a `question`, its `choices` (a list of strings) and the
`answer` (the 0-based index of the right choice, or its letter A, B, C, ...). Read from .jsonl / .json / .parquet /
.csv files (a folder: the files named after the split), checked row by row, and written out in one form for
lm-evaluation-harness (`tuneflow.modeling.benchmarks`)."""

from __future__ import annotations

import json
from pathlib import Path

from tuneflow.data.formats import MAX_REPORTED, DatasetError, read_rows
from tuneflow.modeling.benchmarks import LETTERS


def _answer(value, n_choices: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        return None
    return index if 0 <= index < n_choices else None


def load_questions(path: Path, split: str) -> list[dict]:
    """Every row as {question, choices, answer: index}; a DatasetError lists the bad rows with file and row."""
    rows, problems = [], []
    for file, number, row in read_rows(path, split):
        where = f"{file}: row {number}"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object with question, choices and answer")
            continue
        question, choices = row.get("question"), row.get("choices")
        if isinstance(choices, str):  # a CSV cell: a JSON list
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                pass
        if not isinstance(question, str) or not question.strip():
            problems.append(f"{where}: field 'question' is missing or empty")
        elif not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS) \
                or not all(isinstance(c, str) and c.strip() for c in choices):
            problems.append(f"{where}: field 'choices' must be a list of 2 to {len(LETTERS)} non-empty strings")
        elif (answer := _answer(row.get("answer"), len(choices))) is None:
            problems.append(f"{where}: field 'answer' must be the index (0 to {len(choices) - 1}) or the letter "
                            f"(A to {LETTERS[len(choices) - 1]}) of a choice, got {row.get('answer')!r}")
        else:
            rows.append({"question": question, "choices": [str(c) for c in choices], "answer": answer})
    if problems:
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        more = [f"  - ... and {len(problems) - MAX_REPORTED} more"] if len(problems) > MAX_REPORTED else []
        head = f"{len(problems)} invalid rows in the multiple-choice set {path}:"
        raise DatasetError("\n".join([head, *shown, *more]))
    if not rows:
        raise DatasetError(f"{path}: the multiple-choice set has no rows")
    return rows


def write_questions(rows: list[dict], file: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return file
