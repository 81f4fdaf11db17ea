"""Reading instruction datasets in the formats users bring, into one shape: a list of chat messages.

alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
sharegpt: {"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}], "system"?,
"tools"?}
messages: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content"}]}
preference: a prompt ({"prompt"} or {"messages"}, TRL; {"instruction", "input"?} or {"conversations"}, LLaMA-Factory)
            with {"chosen", "rejected"} answers; read as the chosen conversation, its last message holding "rejected"

Every problem names the file, the row and the field.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from tuneflow.core.errors import TuneflowError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    # Tool-use turns (glaive / LLaMA-Factory style): the call is the assistant's, the result is the tool's.
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = {"system", "user", "assistant", "tool"}


class DatasetError(TuneflowError, ValueError):
    """A dataset that cannot be used; the message names the file, row and field."""


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and ".git" not in p.parts)
    if not files:
        raise DatasetError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files found")
    return files


def split_files(path: Path, split: str | None) -> list[Path]:
    """The data files of ``split``: ``path`` itself if it is a file; in a folder (a Hub snapshot), the files whose
    name or folder is the split's (test.jsonl, data/test-00000-of-00001.parquet, test/part.json). None: every file."""
    files = data_files(path)
    if path.is_file() or split is None:
        return files
    named = re.compile(rf"(^|[/_.-]){re.escape(split)}([/.-]|$)")  # train: not train_prefs-0000.parquet
    chosen = [f for f in files if named.search(f.relative_to(path).as_posix())]
    if not chosen:
        listed = ", ".join(f.relative_to(path).as_posix() for f in files[:5])
        raise DatasetError(f"{path}: no data file of split {split!r} (files: {listed}); name one after the split, or "
                           "set another split")
    return chosen


def read_rows(path: Path, split: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """Yield (file, 1-based row number, row) for every row of every data file of ``split`` under ``path``."""
    for file in split_files(path, split):
        name = str(file)
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield name, lineno, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DatasetError(f"{name}: line {lineno}: not valid JSON ({exc.msg})") from None
        elif file.suffix == ".json":
            try:
                with open(file, encoding="utf-8") as fh:
                    data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{name}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]} or {"data": [...]}
            if not isinstance(data, list):
                raise DatasetError(f"{name}: expected a JSON list of rows")
            for i, row in enumerate(data, 1):
                yield name, i, row
        elif file.suffix == ".csv":
            import pandas as pd

            # Every cell is text: answers such as "3" or "None" must not turn into numbers or missing values.
            table = pd.read_csv(file, dtype=str, keep_default_na=False).to_dict("records")
            for i, row in enumerate(table, 1):
                yield name, i, row
        else:
            import datasets

            table = datasets.load_dataset("parquet", data_files=str(file), split="train")
            for i, row in enumerate(table, 1):
                yield name, i, row


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DatasetError(f"{where}: field '{key}' is missing")
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _require_dict(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    return row


def alpaca_to_messages(row: Any, where: str) -> list[dict]:
    row = _require_dict(row, where)
    messages = []
    system = _text(row, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DatasetError(f"{where}: field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DatasetError(f"{where}: field 'history[{i}]' must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(row, "instruction", where)
    extra = _text(row, "input", where, required=False)
    prompt = f"{instruction}\n{extra}" if extra else instruction
    if not prompt.strip():
        raise DatasetError(f"{where}: field 'instruction' is empty")
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(row, "output", where)})
    return messages


def sharegpt_to_messages(row: Any, where: str) -> list[dict]:
    row = _require_dict(row, where)
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: field 'conversations' must be a non-empty list")
    messages = []
    system = _text(row, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: field '{field}' must be an object with 'from' and 'value'")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise DatasetError(
                f"{where}: field '{field}.from' is {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn, "value", f"{where}: {field}")})
    return messages


def messages_to_messages(row: Any, where: str) -> list[dict]:
    row = _require_dict(row, where)
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: field 'messages' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise DatasetError(f"{where}: field '{field}' must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in MESSAGE_ROLES:
            raise DatasetError(f"{where}: field '{field}.role' is {role!r}; expected one of {sorted(MESSAGE_ROLES)}")
        messages.append({"role": role, "content": _text(turn, "content", f"{where}: {field}")})
    return messages


def _answer(value: Any, where: str, field: str) -> str:
    """A chosen or rejected answer: a string, or one assistant message ({role, content} or ShareGPT's {from, value}),
    alone or last in a list (UltraFeedback's layout repeats the prompt's messages before it)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        value = value[-1]
    if isinstance(value, dict):
        role = value.get("role", SHAREGPT_ROLES.get(value.get("from")))
        content = value.get("content", value.get("value"))
        if role == "assistant" and isinstance(content, str):
            return content
    if value is None:
        raise DatasetError(f"{where}: field '{field}' is missing")
    raise DatasetError(f"{where}: field '{field}' must be the answer: a string, or one assistant message")


def _implicit_prompt(row: dict, where: str) -> tuple[list[dict], Any, Any]:
    """TRL's implicit-prompt layout: chosen and rejected are whole conversations; the prompt is what they share."""
    chosen = messages_to_messages({"messages": row.get("chosen")}, where)
    rejected = messages_to_messages({"messages": row.get("rejected")}, where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def preference_to_messages(row: Any, where: str) -> list[dict]:
    """A prompt with a chosen and a rejected answer, as the conversation of the prompt and the chosen answer, whose
    last message also holds ``rejected``. Layouts: TRL's (``prompt`` as text or messages, or ``messages``; or only
    ``chosen`` and ``rejected`` as whole conversations), LLaMA-Factory's alpaca (``instruction``, ``input``,
    ``system``, ``history``) and sharegpt (``conversations``, the prompt), each with ``chosen`` and ``rejected``."""
    row = _require_dict(row, where)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "conversations" in row:
        prompt = sharegpt_to_messages(row, where)
    elif "instruction" in row:
        prompt = alpaca_to_messages({**row, "output": ""}, where)[:-1]
    elif "prompt" in row:
        text = row["prompt"]
        prompt = ([{"role": "user", "content": text}] if isinstance(text, str)
                  else messages_to_messages({"messages": text}, f"{where}: field 'prompt'"))
    elif "messages" in row:
        prompt = messages_to_messages(row, where)
    elif isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1:
        prompt, chosen, rejected = _implicit_prompt(row, where)
    else:
        raise DatasetError(f"{where}: no prompt: expected field 'prompt' or 'messages' (TRL), 'instruction' or "
                           "'conversations' (LLaMA-Factory), or 'chosen' and 'rejected' as whole conversations")
    chosen, rejected = _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected")
    if chosen.strip() == rejected.strip():
        raise DatasetError(f"{where}: fields 'chosen' and 'rejected' are the same answer")
    return [*prompt, {"role": "assistant", "content": chosen, "rejected": rejected}]


CONVERTERS = {"alpaca": alpaca_to_messages, "sharegpt": sharegpt_to_messages, "messages": messages_to_messages,
              "preference": preference_to_messages}


ANSWER_FIELD = {"alpaca": "output", "sharegpt": "conversations", "messages": "messages", "preference": "chosen"}


def check_conversation(messages: list[dict], where: str, field: str) -> None:
    """A trainable conversation: optional system first, then user and assistant turns, ending on an answer."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if any(m["role"] == "system" for m in body):
        raise DatasetError(f"{where}: field '{field}': a system message may only come first")
    if not body or body[-1]["role"] != "assistant":
        raise DatasetError(f"{where}: field '{field}': the conversation must end with an assistant answer")
    if body[0]["role"] != "user":
        raise DatasetError(f"{where}: field '{field}': the conversation must start with a user message")
    if not body[-1]["content"].strip():
        raise DatasetError(f"{where}: field '{field}': the assistant answer is empty")


MAX_REPORTED = 10


def load_conversations(path: Path, fmt: str, invalid: Counter | None = None,
                       columns: dict[str, str] | None = None, split: str | None = None,
                       key: str = "dataset") -> list[list[dict]]:
    """Every row of the dataset (of ``split``'s files, if given) as validated chat messages; ``columns`` maps the
    format's fields onto the file's own column names (``key``.columns: the config key messages name).

    Bad rows raise one DatasetError that lists them all (the first MAX_REPORTED), unless ``invalid`` is given:
    then bad rows are skipped and counted there by reason (the message without its file and row). A mapped column
    that no row of a file has is one error naming the file and the column.
    """
    convert = CONVERTERS[fmt]
    conversations, problems = [], []
    seen: dict[str, set] = {}  # file -> the columns its rows have
    for file, row_no, row in read_rows(path, split):
        where = f"{file}: row {row_no}"
        if columns and isinstance(row, dict):
            seen.setdefault(file, set()).update(row)
            row = {**{k: v for k, v in row.items() if k not in columns.values()},
                   **{field: row[column] for field, column in columns.items() if column in row}}
        try:
            messages = convert(row, where)
            check_conversation(messages, where, ANSWER_FIELD[fmt])
        except DatasetError as exc:
            if invalid is None:
                problems.append(str(exc))
            else:
                invalid[str(exc).removeprefix(f"{where}: ")] += 1
            continue
        conversations.append(messages)
    for file, names in seen.items():
        missing = [f"{field} from column '{column}'" for field, column in columns.items() if column not in names]
        if missing:
            raise DatasetError(f"{file}: {key}.columns reads {', '.join(missing)}, which the file lacks (its "
                               f"columns: {', '.join(sorted(names))})")
    if problems:
        shown = [f"  - {p}" for p in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"  - ... and {len(problems) - MAX_REPORTED} more")
        rows = "1 invalid row" if len(problems) == 1 else f"{len(problems)} invalid rows"
        raise DatasetError(f"{rows} for {key}.format={fmt}; fix them, or set prep.on_invalid: drop to skip "
                           "them:\n" + "\n".join(shown))
    if not conversations:
        raise DatasetError(f"{path}: the dataset has no {'valid ' if invalid else ''}rows")
    return conversations


def load_dataset_rows(path: Path, cfg, source, key: str) -> tuple[list[list[dict]], Counter]:
    """The valid conversations of ``source`` (configured under ``key``: a training dataset, or eval_dataset) under
    cfg.prep.on_invalid, the first source.max_samples of them if set, and the dropped rows counted by reason.

    With on_invalid=drop it still fails when more than prep.max_invalid_fraction of the rows are invalid."""
    invalid: Counter = Counter()
    conversations = load_conversations(path, source.format, invalid if cfg.prep.on_invalid == "drop" else None,
                                       source.columns, source.split, key)
    dropped = sum(invalid.values())
    if dropped / (dropped + len(conversations)) > cfg.prep.max_invalid_fraction:
        raise DatasetError(
            f"{path}: {dropped / (dropped + len(conversations)):.0%} of rows are invalid, more than "
            f"prep.max_invalid_fraction={cfg.prep.max_invalid_fraction}; reasons: {dict(invalid.most_common(5))}"
        )
    return conversations[:source.max_samples], invalid


def split_indices(n: int, eval_size: float, seed: int, key: str = "dataset") -> tuple[list[int], list[int]]:
    """Seeded (train, eval) row indices; eval_size (of the dataset configured under ``key``) is a fraction below 1,
    else a row count."""
    n_eval = int(eval_size) if eval_size >= 1 else max(1, round(n * eval_size))
    if n_eval >= n:
        raise DatasetError(f"{key}.eval_size: {eval_size:g} leaves no training rows out of {n} valid rows; lower it")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])
