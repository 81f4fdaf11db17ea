"""Prepared data: every row validated, rendered with the model's chat template, tokenized with prompts masked, split.

    build(cfg, model_dir, dataset_paths, out)   # writes an Arrow DatasetDict (train, eval) and stats.json to out

Rows are tokenized in batches by ``datasets.Dataset.map`` on every usable CPU core (fewer for small datasets).
The prepare stage (tasks/prepare.py) caches and publishes the result; training and evaluation only read it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import Counter
from pathlib import Path

from tuneflow.core.config import TuneflowConfig
from tuneflow.data.formats import load_dataset_rows, split_indices
from tuneflow.data.tokenize import IGNORE_INDEX, encode_batch, prompt_and_reference

log = logging.getLogger(__name__)

# Each worker process costs about half a second of CPU time to start and to load the tokenizer into (measured with a
# 32k-token BPE), what encoding ~600 rows takes: with fewer rows than this per process, extra processes barely pay.
MIN_ROWS_PER_PROCESS = 2000


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_proc(n_rows: int) -> int:
    return max(1, min(usable_cores(), n_rows // MIN_ROWS_PER_PROCESS))


def _encode_rows(batch: dict, tokenizer, cutoff_len: int, preference: bool) -> dict:
    # A preference row's last message also holds the rejected answer (tuneflow.data.formats): not part of the chat.
    conversations = [[{"role": m["role"], "content": m["content"]} for m in c] for c in batch["messages"]]
    enc = encode_batch(tokenizer, conversations, cutoff_len)
    prompts, references = zip(*map(prompt_and_reference, conversations))
    return {
        **enc,
        "prompt": [json.dumps(prompt, ensure_ascii=False) for prompt in prompts],
        "reference": list(references),  # the answer; of a preference pair, the chosen one
        **({"rejected": [c[-1]["rejected"] for c in batch["messages"]]} if preference else {}),
        "label_tokens": [len(labels) - labels.count(IGNORE_INDEX) for labels in enc["labels"]],
    }


def encode_rows(tokenizer, conversations: list[list[dict]], cutoff_len: int, num_proc: int | None = None,
                desc: str = "Tokenizing"):
    """A Dataset of the conversations encoded (``encode_batch`` columns, prompt, reference, label_tokens, and for
    preference pairs the rejected answer), in order.

    ``num_proc`` processes share the work (at most one per row); None: ``default_num_proc``."""
    from datasets import Dataset, Features, List, Value

    # Declared, not inferred: inferring scans every token id. The types are those Dataset.from_list gives the rows.
    features = Features({
        "input_ids": List(Value("int32")), "labels": List(Value("int64")), "length": Value("int64"),
        "full_length": Value("int64"), "prompt": Value("string"), "reference": Value("string"),
        "label_tokens": Value("int64"),
    })
    preference = "rejected" in conversations[0][-1]
    if preference:
        features["rejected"] = Value("string")
    num_proc = min(num_proc or default_num_proc(len(conversations)), len(conversations))
    started = time.perf_counter()
    encoded = Dataset.from_dict({"messages": conversations}).map(
        _encode_rows,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "cutoff_len": cutoff_len, "preference": preference},
        remove_columns=["messages"],
        features=features,
        # Nothing is cached, and fingerprinting the map would hash (pickle) the whole tokenizer.
        new_fingerprint=uuid.uuid4().hex,
        desc=desc,
    )
    seconds = time.perf_counter() - started
    log.info("%s: %d rows in %.1f s (%.0f rows/s, %d processes)",
             desc, len(conversations), seconds, len(conversations) / seconds, num_proc)
    return encoded


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def mix(sizes: list[int], weights: list[float], strategy: str, seed: int) -> list[tuple[int, int]]:
    """(source, row) of every training row in mixed order (prep.mix_strategy): drawn to the weights by datasets'
    seeded ``interleave_datasets`` until the first source runs out (interleave_under) or every one has been used once
    (interleave_over), or every row of each source once, in order (concat; one source)."""
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    parts = [Dataset.from_dict({"source": [i] * n, "row": list(range(n))}) for i, n in enumerate(sizes)]
    if strategy == "concat" or len(parts) == 1:
        mixed = concatenate_datasets(parts)
    else:
        stopping = "first_exhausted" if strategy == "interleave_under" else "all_exhausted"
        mixed = interleave_datasets(parts, probabilities=[w / sum(weights) for w in weights], seed=seed,
                                    stopping_strategy=stopping)
    return list(zip(mixed["source"], mixed["row"]))


def build(cfg: TuneflowConfig, model_dir: Path, dataset_paths: list[Path], out: Path, num_proc: int | None = None,
          eval_path: Path | None = None) -> dict:
    """Tokenize and save the training datasets (``dataset_paths``, one per cfg.sources, mixed) to ``out``; return
    the statistics. The eval split is cfg.eval_dataset's rows (in ``eval_path``) when there is one, else a seeded
    held-out split of each training dataset (its eval_size), taken before the mix.

    ``num_proc``: processes that tokenize; None: every usable core, fewer for small datasets."""
    from datasets import DatasetDict

    from tuneflow.modeling.load import load_tokenizer

    tokenizer = load_tokenizer(model_dir, cfg)
    invalid: Counter = Counter()
    parts, held_out = [], []
    for (key, source), path in zip(cfg.sources, dataset_paths, strict=True):
        conversations, dropped = load_dataset_rows(Path(path), cfg, source, key)
        invalid += dropped
        if cfg.eval_dataset is None:
            train_idx, eval_idx = split_indices(len(conversations), source.eval_size, cfg.train.seed, key)
            held_out += [conversations[i] for i in eval_idx]
            conversations = [conversations[i] for i in train_idx]
        parts.append(conversations)
    if cfg.eval_dataset is not None:
        held_out, dropped = load_dataset_rows(Path(eval_path), cfg, cfg.eval_dataset, "eval_dataset")
        invalid += dropped
    elif len(parts) > 1:  # evaluation and the frozen set take the first rows: every source among them
        random.Random(cfg.train.seed).shuffle(held_out)
    order = mix([len(p) for p in parts], [s.weight for _, s in cfg.sources], cfg.prep.mix_strategy, cfg.train.seed)
    rows = {"train": [parts[source][row] for source, row in order], "eval": held_out}
    splits, lengths, label_tokens = {}, [], {}
    for split, chosen in rows.items():
        encoded = encode_rows(tokenizer, chosen, cfg.prep.cutoff_len, num_proc, desc=f"Tokenizing {split} rows")
        lengths += encoded["full_length"]
        counts = encoded["label_tokens"]
        # A row whose answer lies entirely past cutoff_len has nothing to learn from (a pair: its prompt leaves no
        # room for either answer): drop it.
        kept = [row for row, count in enumerate(counts) if count]
        if not kept:
            raise ValueError(f"no {split} pairs left: every prompt leaves no room for its answers under "
                             f"prep.cutoff_len={cfg.prep.cutoff_len}" if "rejected" in encoded.column_names else
                             f"no {split} rows left: every answer lies past prep.cutoff_len={cfg.prep.cutoff_len}")
        splits[split] = encoded.select(kept).remove_columns("label_tokens")
        label_tokens[split] = sum(counts)
        if split == "train":
            realised = Counter(order[row][0] for row in kept)
    mixed = [{"name": source.name_or_path, "weight": source.weight, "available": len(parts[i]), "rows": realised[i],
              "share": realised[i] / len(splits["train"])} for i, (_, source) in enumerate(cfg.sources)]
    DatasetDict(splits).save_to_disk(str(out))
    stats = {
        "rows": len(rows["train"]) + len(rows["eval"]),
        "train_rows": len(splits["train"]),
        "eval_rows": len(splits["eval"]),
        "dropped_cut_off": len(rows["train"]) + len(rows["eval"]) - len(splits["train"]) - len(splits["eval"]),
        "dropped_invalid": sum(invalid.values()),
        "invalid_reasons": dict(invalid),
        "truncation_rate": sum(n > cfg.prep.cutoff_len for n in lengths) / len(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_p50": _percentile(lengths, 0.5),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": float(max(lengths)),
        "train_label_tokens": label_tokens["train"],
        "mix": mixed,  # per training dataset: its rows in the training split (after the cut-off), and their share
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
