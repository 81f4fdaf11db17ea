"""Render conversations with the tokenizer's own chat template and mask everything but the answers.

The label mask is found in character space: for each assistant turn, the text rendered for the turns before it
(with the generation prompt) must be a prefix of the text rendered with it; the characters in between are that
answer, including the template's end-of-turn token. Tokens whose characters fall in an answer keep their id as
label, all others get -100, so the loss is computed on responses only (as QLoRA trains).

Conversations are encoded a batch at a time (``encode_batch``): three template calls render every prefix the batch
needs (each text once: up to the last answer is the full text) and one fast-tokenizer call tokenizes the batch.
``encode`` does the same for one conversation.
"""

from __future__ import annotations

from bisect import bisect_right

from tuneflow.core.errors import TuneflowError

IGNORE_INDEX = -100


class TemplateError(TuneflowError, ValueError):
    pass


def render_batch(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
    if not conversations:
        return []
    return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans_batch(tokenizer, conversations: list[list[dict]]) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Each conversation's full rendered text and the (start, end) character span of every assistant answer in it."""
    texts = render_batch(tokenizer, conversations, add_generation_prompt=False)
    turns = [(row, i) for row, messages in enumerate(conversations) for i, m in enumerate(messages)
             if m["role"] == "assistant"]
    befores = render_batch(tokenizer, [conversations[row][:i] for row, i in turns], add_generation_prompt=True)
    # Up to a conversation's last message is its full text, already rendered: only earlier answers need a render.
    earlier = [(row, i) for row, i in turns if i + 1 < len(conversations[row])]
    prefixes = [conversations[row][: i + 1] for row, i in earlier]
    uptos = dict(zip(earlier, render_batch(tokenizer, prefixes, add_generation_prompt=False)))
    spans: list[list[tuple[int, int]]] = [[] for _ in conversations]
    for (row, i), before in zip(turns, befores):
        text = texts[row]
        upto = uptos.get((row, i), text)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise TemplateError(
                "the chat template does not render earlier turns unchanged when later turns are added; "
                "set model.chat_template to a template that does"
            )
        spans[row].append((len(before), len(upto)))
    return texts, spans


def _edges(spans: list[tuple[int, int]]) -> list[int]:
    """The spans' union as sorted edges [s0, e0, s1, e1, ...]: a character lies in an answer exactly when an odd
    number of edges are <= its position."""
    edges: list[int] = []
    for start, end in sorted(spans):
        if start >= end:
            continue
        if edges and start <= edges[-1]:
            edges[-1] = max(edges[-1], end)
        else:
            edges += [start, end]
    return edges


def encode_batch(tokenizer, conversations: list[list[dict]], cutoff_len: int) -> dict[str, list]:
    """Columns input_ids, labels (prompt tokens masked with -100), length and full_length, cut to ``cutoff_len``."""
    texts, spans = answer_spans_batch(tokenizer, conversations)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "full_length": []}
    for ids, offsets, row_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
        edges = _edges(row_spans)
        kept = ids[:cutoff_len]
        out["input_ids"].append(kept)
        out["labels"].append([tok if bisect_right(edges, start) & 1 else IGNORE_INDEX
                              for tok, (start, _) in zip(kept, offsets)])
        out["length"].append(len(kept))
        out["full_length"].append(len(ids))
    return out


def encode(tokenizer, messages: list[dict], cutoff_len: int) -> dict:
    """input_ids and labels (prompt tokens masked with -100) of one conversation, cut to ``cutoff_len`` tokens."""
    return {name: column[0] for name, column in encode_batch(tokenizer, [messages], cutoff_len).items()}


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """What evaluation asks (every turn before the last answer) and the answer it expects."""
    return messages[:-1], messages[-1]["content"]
