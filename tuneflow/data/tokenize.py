"""Render conversations with the tokenizer's own chat template and mask everything but the answers.

The label mask is found in character space: for each assistant turn, the text rendered for the turns before it
(with the generation prompt) must be a prefix of the text rendered with it; the characters in between are that
answer, including the template's end-of-turn token. Tokens whose characters fall in an answer keep their id as
label, all others get -100, so the loss is computed on responses only (as QLoRA trains).
"""

from __future__ import annotations

IGNORE_INDEX = -100


class TemplateError(ValueError):
    pass


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the (start, end) character span of every assistant answer in it."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise TemplateError(
                "the chat template does not render earlier turns unchanged when later turns are added; "
                "set model.chat_template to a template that does"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode(tokenizer, messages: list[dict], cutoff_len: int) -> dict:
    """input_ids and labels (prompt tokens masked with -100), cut to ``cutoff_len`` tokens."""
    text, spans = answer_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        labels.append(tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX)
    full_len = len(ids)
    return {
        "input_ids": ids[:cutoff_len],
        "labels": labels[:cutoff_len],
        "length": min(full_len, cutoff_len),
        "full_length": full_len,
    }


def prompt_and_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """What evaluation asks (every turn before the last answer) and the answer it expects."""
    return messages[:-1], messages[-1]["content"]
