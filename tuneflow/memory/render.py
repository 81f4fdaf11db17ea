"""The memory plan as the table `tuneflow plan` prints."""

from __future__ import annotations

from tuneflow.memory.estimate import MARGIN_FIXED, MARGIN_FRACTION, OPTIMIZER_STATES, MemoryPlan
from tuneflow.memory.shape import GiB

LINES = (
    ("quantized_weights", "quantised weights"),
    ("frozen_weights", "frozen weights"),
    ("reference_weights", "DPO reference (a frozen copy of the model)"),
    ("adapter", "trainable parameters + gradients"),
    ("optimizer", "optimizer states"),
    ("activations", "activations (estimate, uncalibrated)"),
    ("logits", "loss: logits"),
    ("margin", f"margin ({MARGIN_FIXED / GiB:.2f} GiB + {MARGIN_FRACTION:.0%})"),
)


def render(p: MemoryPlan, model: str, largest: int | None = None) -> str:
    s, shape = p.settings, p.shape
    frozen_what = {"qlora": "embeddings, lm_head, norms", "lora": "the whole base", "full": "none",
                   "freeze": f"all but the top {min(s.freeze_layers, shape.layers)} layers"}[s.method]
    optim = OPTIMIZER_STATES[s.optimizer][1]
    if s.zero.deepspeed:  # DeepSpeed steps fp32 copies
        optim = optim.replace("in the parameters' dtype", "in fp32") + (
            " + fp32 master" if s.precision != "fp32" else "")
    if s.optimizer.startswith("paged_"):
        optim += "; paged to CPU memory under pressure"
    labels = dict(LINES)
    labels["frozen_weights"] += f" ({frozen_what})"
    labels["quantized_weights"] = ("8-bit weights (+ a scale per row)" if s.quant_bits == 8 else
                                   f"4-bit {s.quant_type.upper()} weights (+ "
                                   f"{'double-quant constants' if s.double_quant else 'fp32 block scales'})")
    lora = "LoRA " if s.method in ("qlora", "lora") else ""
    labels["adapter"] += f" ({p.params['trainable'] / 1e6:,.1f}M {lora}params)"
    labels["optimizer"] += f" ({optim})"
    labels["logits"] += (f" of {min(s.loss_chunk, s.tokens)} tokens at a time + labelled hidden states"
                         if s.loss_chunk else " of every token, fp32")
    micro = (f"up to {s.tokens} tokens (train.tokens_per_batch {s.tokens_per_batch}, rows of <= {s.seq})"
             if s.tokens_per_batch is not None else f"{s.batch} x {s.seq} tokens" + (" packed" if s.packing else "")
             + (" per answer: pairs of a chosen and a rejected one" if s.pairs else ""))
    loss = f"loss chunked by {s.loss_chunk} tokens" if s.loss_chunk else "full-logits loss"
    head = (f"memory plan per rank: {model} ({shape.model_type}, {p.params['total'] / 1e9:.2f}B params), {s.method}, "
            f"{'auto (bf16, fp16 before Ampere)' if s.precision == 'auto' else s.precision}, {s.zero.label} over "
            f"{s.world} rank{'s' if s.world > 1 else ''}\n"
            f"  micro-batch {micro}, gradient checkpointing {'on' if s.checkpointing else 'off'}, {loss}")
    shown = [k for k, _ in LINES if k != "reference_weights" or s.reference]
    width = max(len(labels[k]) for k in shown) + 2
    rows = [head] + [f"  {labels[k]:<{width}}{p.per_rank[k] / GiB:9.2f} GiB" for k in shown]
    rows.append(f"  {'total':<{width}}{p.per_rank['total'] / GiB:9.2f} GiB")
    if p.gpu_memory is None:
        rows.append("GPU memory unknown (no GPU visible, train.gpu_memory unset): pass --gpu-memory, "
                    "e.g. --gpu-memory 24GiB")
    else:
        verdict = "fits" if p.fits else "does NOT fit"
        key = "tokens_per_batch" if s.tokens_per_batch is not None else "per_device_batch_size"
        extra = f"; the largest {key} that fits is {largest}" if largest else ""
        rows.append(f"GPU memory {p.gpu_memory / GiB:.2f} GiB: {verdict}{extra}")
    rows += [f"note: {n}" for n in p.notes]
    return "\n".join(rows)
