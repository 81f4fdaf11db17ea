"""The per-row encoding tuneflow's batched prep replaced: what its output is checked against
(tests/unit/test_prepare.py) and timed against (bench/prep.py)."""

from __future__ import annotations

from tuneflow.data.tokenize import TemplateError


def reference_encode(tokenizer, messages, cutoff_len):
    """How a row was encoded before batching: three template renders per answer, one row at a time."""
    def render(turns, add_generation_prompt):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)

    text, spans = render(messages, False), []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before, upto = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise TemplateError("the chat template does not render earlier turns unchanged")
            spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    starts = [start for start, _ in enc["offset_mapping"]]
    labels = [t if any(s <= start < e for s, e in spans) else -100 for t, start in zip(ids, starts)]
    return {"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len], "length": min(len(ids), cutoff_len),
            "full_length": len(ids)}
