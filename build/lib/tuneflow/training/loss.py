"""The chunked loss (`train.loss_chunk_tokens`, the default): cross-entropy that never holds the full logits.

A causal LM's usual loss projects every position onto the vocabulary (micro-batch tokens x vocabulary logits, then an
fp32 copy, then the log-softmax kept for backward), although only positions whose next token is labelled count:
the prompt, the padding and each row's last token do not. Here the model runs with transformers' own
``logits_to_keep`` set to the labelled positions, so its decoder output is sliced to them before ``lm_head``; that
sliced hidden state is taken from ``lm_head``'s input (which is then fed no rows), and the projection + fp32
cross-entropy run ``chunk`` tokens at a time, each chunk recomputed in backward instead of kept. At most one chunk's
logits exist at once. The sum over labelled tokens is divided by the same count the standard loss divides by
(``num_items_in_batch``, the labelled tokens of the whole accumulated step), so it is the same loss: the tests hold
the loss and gradients to the plain full-logits loss in fp32, padded and packed, with and without LoRA.

``lm_head`` is called as a module, so LoRA on it (peft), DeepSpeed ZeRO-3's parameter gathering and autocast all
apply as in the model's own forward. A model whose forward has no ``logits_to_keep`` gets the standard loss.
"""

from __future__ import annotations

import inspect
from functools import partial

IGNORE_INDEX = -100


def supports_chunked_loss(model) -> bool:
    """Whether the (unwrapped, possibly peft) causal LM slices by ``logits_to_keep`` and has an output layer."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return head is not None and "logits_to_keep" in inspect.signature(base.forward).parameters


def _chunk_nll(head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(model, inputs: dict, labels, chunk: int, num_items_in_batch=None, *,
                           head=None, use_reentrant: bool = False):
    """(loss, outputs) of a causal LM on ``inputs`` with next-token ``labels`` (-100 = not trained), the vocabulary
    projection done ``chunk`` labelled tokens at a time. ``model`` may be wrapped (DDP, DeepSpeed); ``head`` is its
    output layer (default: ``model.get_output_embeddings()``). The loss is the sum of token losses divided by
    ``num_items_in_batch`` (default: this batch's labelled tokens), as transformers' ForCausalLMLoss divides it."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if head is None:
        head = model.get_output_embeddings()
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t+1
    targets = labels[:, 1:][keep[:, :-1]]

    captured = {}

    def take_input(module, args):
        captured["hidden"] = args[0]
        return (args[0][:0],) + tuple(args[1:])  # lm_head projects nothing inside the model's forward

    handle = head.register_forward_pre_hook(take_input)
    try:
        outputs = model(**inputs, logits_to_keep=keep)
    finally:
        handle.remove()
    hidden = captured["hidden"]  # (labelled tokens, hidden), in the order of `targets`
    total = hidden.sum() * 0.0  # keeps the graph when no token is labelled
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(partial(_chunk_nll, head), h, y, use_reentrant=use_reentrant)
        else:
            total = total + _chunk_nll(head, h, y)
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    count = torch.as_tensor(count, device=total.device).clamp_min(1)
    return total.float() / count, outputs
