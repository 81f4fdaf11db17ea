"""Efficiency figures logged to every training run, so runs compare on cost as well as on loss.

- tokens_per_s: real (non-padding) tokens of all ranks per second, between two logging steps.
- padding_fraction: the share of rank 0's micro-batch positions that were padding so far (0 when packed).
- peak memory of every rank, logged once at the end: on a GPU `max_memory_allocated` and `max_memory_reserved`
  (peak_memory_allocated_rank<i>, peak_memory_reserved_rank<i>), on a CPU the process's peak RSS
  (peak_rss_rank<i>), in bytes.
- mfu, on a GPU whose dense bf16/fp16 peak is known (PEAK_FLOPS): achieved model FLOPs / (peak x ranks).

FLOPs per token count the matrix multiplications of the decoder linears and the lm_head, N weights in all (the
embedding lookup is no matmul): forward 2N; backward 2N for the activation gradients plus 2 per *trained* weight
for its weight gradient. So full fine-tuning is the usual 6N; LoRA and QLoRA are 4N + 6 x (LoRA parameters), since
frozen weights get no weight gradient; freeze is 4N + 2 x (weights of the trained layers). Attention's own
sequence-length term and the recomputation of gradient checkpointing are not counted (model FLOPs, not hardware
FLOPs), so MFU is slightly understated at long sequences.
"""

from __future__ import annotations

# Dense bf16/fp16 tensor-core peak per GPU, from the vendors' data sheets (FLOP/s, without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_token(cfg, model_config: dict) -> float | None:
    """Model FLOPs per trained token (see above); None for a model the memory plan cannot read."""
    from tuneflow.memory.shape import ModelShape, PlanError, lora_param_count

    try:
        shape = ModelShape.from_config(model_config)
    except PlanError:
        return None
    n = shape.layers * shape.layer_linear_params() + shape.vocab * shape.hidden
    t = cfg.train
    if t.method == "full":
        return 6.0 * n
    if t.method == "freeze":
        return 4.0 * n + 2.0 * min(t.freeze_trainable_layers, shape.layers) * shape.layer_linear_params()
    return 4.0 * n + 6.0 * lora_param_count(shape, t.lora.rank, t.lora.target_modules)


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def peak_memory() -> dict[str, int]:
    """This process's peak memory so far, in bytes."""
    import resource

    import torch

    if torch.cuda.is_available():
        return {"peak_memory_allocated": torch.cuda.max_memory_allocated(),
                "peak_memory_reserved": torch.cuda.max_memory_reserved()}
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux reports KiB


def peak_memory_of_every_rank() -> dict[str, int]:
    """{"<figure>_rank<i>": bytes} for every rank (a collective: every rank must call it)."""
    import torch.distributed as dist

    mine = peak_memory()
    ranks = [mine]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    return {f"{k}_rank{i}": v for i, figures in enumerate(ranks) for k, v in figures.items()}
