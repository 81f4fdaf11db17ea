"""Greedy generation (batched, or streamed token by token) and held-out loss, shared by evaluate, export and the CLI."""

from __future__ import annotations

import math
import threading
from typing import Iterator

import torch


def _inputs(tokenizer, prompts: list[list[dict]], device):
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers to chat prompts; the prompt tokens are stripped before decoding."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for i in range(0, len(prompts), batch_size):
        enc = _inputs(tokenizer, prompts[i : i + batch_size], device)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = out[:, enc["input_ids"].shape[1] :]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def stream(model, tokenizer, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
    """Text pieces of a greedy answer as they are generated (generation runs on a background thread)."""
    from transformers import TextIteratorStreamer

    enc = _inputs(tokenizer, [messages], next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id)
    thread = threading.Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs), daemon=True)
    thread.start()
    yield from streamer
    thread.join()


@torch.inference_mode()
def _answer_losses(model, tokenizer, rows: list[dict], batch_size: int) -> Iterator[tuple[float, int]]:
    """Per row: the summed cross-entropy of its answer tokens (prompt tokens are masked, as in training), and their
    count."""
    from transformers import DataCollatorForSeq2Seq

    model.eval()
    tokenizer.padding_side = "right"
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        yield from zip(losses.sum(1).tolist(), (labels != -100).sum(1).tolist())


def eval_loss(model, tokenizer, rows: list[dict], batch_size: int = 8) -> dict[str, float]:
    """Mean cross-entropy over answer tokens (prompt tokens are masked, as in training) and its perplexity."""
    per_row = list(_answer_losses(model, tokenizer, rows, batch_size))
    loss = sum(total for total, _ in per_row) / max(sum(count for _, count in per_row), 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}


def answer_logps(model, tokenizer, rows: list[dict], batch_size: int = 8) -> list[float]:
    """log p(answer | prompt) of each row (``input_ids`` and ``labels``, the answer's tokens labelled)."""
    return [-total for total, _ in _answer_losses(model, tokenizer, rows, batch_size)]
