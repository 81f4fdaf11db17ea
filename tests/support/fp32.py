"""A tiny random Llama in fp32 (sdpa attention unless asked otherwise), and rows whose first half is a masked
prompt: what the exact loss and gradient comparisons of packing and of the chunked loss run on."""

from __future__ import annotations

from pathlib import Path

import torch

from tuneflow.training.batching import IGNORE_INDEX


def tiny_model(folder: Path, attention: str = "sdpa"):
    """(model, tokenizer): the demo's tiny Llama built in ``folder``, fp32, with ``attention``, no KV cache (packing
    needs it off)."""
    from transformers import AutoModelForCausalLM

    from tuneflow.core.config import TuneflowConfig
    from tuneflow.modeling.demo import build
    from tuneflow.modeling.load import load_tokenizer

    model_dir = build(folder, n_rows=30)["model"]
    tokenizer = load_tokenizer(model_dir, TuneflowConfig.model_validate({"dataset": {"name_or_path": "-"}}))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    model.config.use_cache = False
    return model, tokenizer


def rows(lengths: list[int], seed: int = 0) -> list[dict]:
    """Rows of different lengths whose first half is a masked prompt, as prepare writes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, 200, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2:]})
    return out
