"""Prepared data: every row validated, rendered with the model's chat template, tokenized with prompts masked, split.

    build(cfg, model_dir, dataset_path, out)   # writes an Arrow DatasetDict (train, eval) and stats.json to out

The prepare stage (tasks/prepare.py) caches and publishes the result; training and evaluation only read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneflow.config import TuneflowConfig
from tuneflow.data.formats import load_dataset_rows, split_indices
from tuneflow.data.tokenize import encode, prompt_and_reference


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def build(cfg: TuneflowConfig, model_dir: Path, dataset_path: Path, out: Path) -> dict:
    """Tokenize and save the dataset to ``out``; return its statistics."""
    from datasets import Dataset, DatasetDict

    from tuneflow.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir, cfg)
    conversations, invalid = load_dataset_rows(Path(dataset_path), cfg)
    train_idx, eval_idx = split_indices(len(conversations), cfg.dataset.eval_size, cfg.train.seed)
    splits, dropped = {}, 0
    lengths, truncated = [], 0
    for split, indices in (("train", train_idx), ("eval", eval_idx)):
        rows = []
        for i in indices:
            enc = encode(tokenizer, conversations[i], cfg.prep.cutoff_len)
            lengths.append(enc["full_length"])
            truncated += enc["full_length"] > cfg.prep.cutoff_len
            if all(label == -100 for label in enc["labels"]):
                dropped += 1  # the answer is entirely past cutoff_len: nothing to learn from
                continue
            prompt, reference = prompt_and_reference(conversations[i])
            rows.append({**enc, "prompt": json.dumps(prompt, ensure_ascii=False), "reference": reference})
        if not rows:
            raise ValueError(f"no {split} rows left: every answer lies past prep.cutoff_len={cfg.prep.cutoff_len}")
        splits[split] = Dataset.from_list(rows)
    DatasetDict(splits).save_to_disk(str(out))
    stats = {
        "rows": len(conversations),
        "train_rows": len(splits["train"]),
        "eval_rows": len(splits["eval"]),
        "dropped_cut_off": dropped,
        "dropped_invalid": sum(invalid.values()),
        "invalid_reasons": dict(invalid),
        "truncation_rate": truncated / len(lengths),
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_p50": _percentile(lengths, 0.5),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": float(max(lengths)),
        "train_label_tokens": sum(sum(1 for t in r if t != -100) for r in splits["train"]["labels"]),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats
