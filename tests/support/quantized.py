"""The bytes a bitsandbytes-quantised model really holds, for checking the memory plan against."""

from __future__ import annotations


def loaded_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters: the quantised ones with every tensor of each Params4bit's quant_state (nested
    included) or each Int8Params' per-row scales; the others as they are."""
    import torch

    seen, quantized, other = set(), 0, 0

    def tensors(state):
        for value in vars(state).values():
            if torch.is_tensor(value):
                yield value
            elif value is not None and hasattr(value, "absmax"):  # the nested QuantState of double quantisation
                yield from tensors(value)

    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        size = param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        scales = getattr(param, "SCB", None)  # LLM.int8: one fp32 scale per output row
        if state is None and scales is None:
            other += size
            continue
        quantized += size
        for t in tensors(state) if state is not None else [scales]:
            if id(t) not in seen:
                seen.add(id(t))
                quantized += t.numel() * t.element_size()
    return {"quantized": quantized, "frozen": other}
