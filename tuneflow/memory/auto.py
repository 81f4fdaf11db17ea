"""`auto` batch sizes (the largest the memory plan fits) and what stops a config from fitting a GPU, each naming the
key to change."""

from __future__ import annotations

from dataclasses import replace

from tuneflow.core.config import TuneflowConfig, parse_size
from tuneflow.memory.estimate import Settings, estimate, visible_gpu_memory
from tuneflow.memory.shape import LINEAR_NAMES, GiB, ModelShape, PlanError, lora_targets


def _largest(shape: ModelShape, s: Settings, gpu_memory: int, limit: int = 1 << 16, **vary) -> int | None:
    """The largest value of the one setting in ``vary`` ({name: current}) that fits, searching 1..limit."""
    (name, _), = vary.items()
    fits = lambda v: estimate(shape, replace(s, **{name: v})).per_rank["total"] <= gpu_memory  # noqa: E731
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batch_that_fits(cfg: TuneflowConfig, model_config: dict, gpu_memory: int, *,
                            world_size: int | None = None, limit: int = 4096) -> int | None:
    """The largest ``train.per_device_batch_size`` whose plan fits ``gpu_memory`` (for ``per_device_batch_size:
    auto``); None when even 1 does not fit. Planned as row-count micro-batches (no token budget)."""
    shape, s = ModelShape.from_config(model_config), Settings.from_config(cfg, world_size)
    return _largest(shape, replace(s, tokens_per_batch=None), gpu_memory, limit, batch=s.batch)


def largest_tokens_that_fit(cfg: TuneflowConfig, model_config: dict, gpu_memory: int, *,
                            world_size: int | None = None, limit: int = 1 << 22) -> int | None:
    """The largest ``train.tokens_per_batch`` whose plan fits ``gpu_memory`` (for ``tokens_per_batch: auto``), a
    multiple of 64 once above 64; None when even one row of ``prep.cutoff_len`` does not fit."""
    shape, s = ModelShape.from_config(model_config), Settings.from_config(cfg, world_size)
    best = _largest(shape, replace(s, tokens_per_batch=s.seq), gpu_memory, limit, tokens_per_batch=s.seq)
    if best is None:
        return None
    return max(best // 64 * 64, s.seq)  # best >= cutoff_len: below it a lone full row sets the size


AUTO_FALLBACK_ROWS = 4  # per_device_batch_size: auto where no GPU memory is known (TrainConfig's default)


def resolve_auto_batches(cfg: TuneflowConfig, model_config: dict, gpu_memory: int | None = None, *,
                         world_size: int | None = None) -> tuple[TuneflowConfig, list[str]]:
    """``cfg`` with ``train.per_device_batch_size: auto`` and ``train.tokens_per_batch: auto`` replaced by the
    largest values whose memory plan fits the GPU (``gpu_memory``, else ``train.gpu_memory``, else this machine's
    GPU), and one line per choice saying what was picked and why. Without any GPU memory to size by (a CPU-only
    machine, no ``train.gpu_memory``): 4 rows, and a budget of 4 rows of ``prep.cutoff_len`` tokens."""
    t = cfg.train
    if t.per_device_batch_size != "auto" and t.tokens_per_batch != "auto":
        return cfg, []
    if gpu_memory is not None:
        where = f"a {_gpu(gpu_memory)} GPU"
    elif t.gpu_memory:
        gpu_memory, where = parse_size(t.gpu_memory), f"train.gpu_memory {t.gpu_memory}"
    else:
        gpu_memory = visible_gpu_memory()
        where = f"this machine's {_gpu(gpu_memory)} GPU" if gpu_memory else ""
    why_not = "" if gpu_memory else ("no GPU memory to size it by (no GPU visible and train.gpu_memory unset; set "
                                     "train.gpu_memory, e.g. 24GiB, to pick the largest that fits)")
    if gpu_memory:
        try:
            ModelShape.from_config(model_config)
        except PlanError as exc:
            why_not = f"the memory plan cannot size it ({exc})"
    fallback = {"per_device_batch_size": AUTO_FALLBACK_ROWS,
                "tokens_per_batch": AUTO_FALLBACK_ROWS * cfg.prep.cutoff_len}
    updates, notes = {}, []
    for key, find in (("per_device_batch_size", largest_batch_that_fits), ("tokens_per_batch",
                                                                           largest_tokens_that_fit)):
        if getattr(t, key) != "auto":
            continue
        value = None if why_not else find(cfg, model_config, gpu_memory, world_size=world_size)
        if why_not:
            value, reason = fallback[key], why_not
        elif value is None:
            value, reason = (1 if key == "per_device_batch_size" else cfg.prep.cutoff_len), (
                f"nothing fits {where} per the memory plan (tuneflow plan says what to change)")
        else:
            reason = f"the largest that fits {where} per the memory plan"
        updates[key] = value
        notes.append(f"train.{key}: auto -> {value}: {reason}")
    train = t.model_copy(update=updates)
    return cfg.model_copy(update={"train": train}), notes


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _gpu(n: int) -> str:
    g = n / GiB
    return f"{g:.0f} GiB" if abs(g - round(g)) < 0.05 else f"{g:.1f} GiB"


def plan_problems(cfg: TuneflowConfig, model_config: dict, gpu_memory: int | None, *,
                  world_size: int | None = None) -> list[str]:
    """What stops ``cfg`` from fitting a ``gpu_memory``-byte GPU, each naming the key to change; [] when it fits,
    when the GPU is unknown (None) or when the model's layout is one the plan does not know."""
    try:
        shape = ModelShape.from_config(model_config)
    except PlanError:
        return []
    s = Settings.from_config(cfg, world_size)
    problems = []
    matched, unmatched = lora_targets(shape, s.lora_targets)
    if s.method in ("qlora", "lora") and not matched:
        problems.append(f"train.lora.target_modules: {', '.join(unmatched)} match no module of a {shape.model_type} "
                        f"layer; use all-linear or names among {', '.join(LINEAR_NAMES)}")
    if gpu_memory is None:
        return problems
    p = estimate(shape, s, gpu_memory)
    if p.fits:
        return problems
    need, gpu = _gib(p.per_rank["total"]), _gpu(gpu_memory)
    ckpt = None if s.checkpointing else estimate(shape, replace(s, checkpointing=True), gpu_memory)
    or_ckpt = ", or set train.gradient_checkpointing: true" if ckpt is not None and ckpt.fits else ""
    if s.tokens_per_batch is not None:
        best = _largest(shape, s, gpu_memory, s.tokens_per_batch, tokens_per_batch=s.tokens_per_batch)
        if best is not None and best >= s.seq and best < s.tokens_per_batch:
            problems.append(f"train.tokens_per_batch: {s.tokens_per_batch} needs ~{need} per rank on a {gpu} GPU; "
                            f"{max(best // 64 * 64, s.seq)} fits{or_ckpt}")
            return problems
        s = replace(s, batch=1, tokens_per_batch=None)  # not even one full row: the advice below, from one row
    best = _largest(shape, s, gpu_memory, s.batch, batch=s.batch)
    if best is not None and best < s.batch:
        per_step = s.batch * cfg.train.gradient_accumulation_steps
        keep = (f" (with train.gradient_accumulation_steps: {-(-per_step // best)} to keep ~{per_step} examples "
                "per step)")
        problems.append(f"train.per_device_batch_size: {s.batch} needs ~{need} per rank on a {gpu} GPU; "
                        f"{best} fits{keep}{or_ckpt}")
        return problems
    if ckpt is not None and ckpt.fits:
        configured = f"train.tokens_per_batch {cfg.train.tokens_per_batch}" if cfg.train.tokens_per_batch else (
            f"{s.batch}")
        problems.append(f"train.gradient_checkpointing: false needs ~{need} per rank on a {gpu} GPU even at "
                        f"train.per_device_batch_size 1 ({configured} configured); set train.gradient_checkpointing: "
                        "true")
        return problems
    at_one = replace(s, batch=1)
    seq = _largest(shape, at_one, gpu_memory, s.seq, seq=s.seq)
    if seq is not None and seq >= 8:
        problems.append(f"prep.cutoff_len: {s.seq} tokens need ~{_gib(estimate(shape, at_one).per_rank['total'])} "
                        f"per rank even at train.per_device_batch_size 1 on a {gpu} GPU; {seq} fits"
                        + (", or set train.gradient_checkpointing: true" if not s.checkpointing else ""))
        return problems
    static = estimate(shape, replace(at_one, seq=8))
    fixes = []
    if s.method in ("lora", "full", "freeze"):
        fixes.append("train.method: qlora (a 4-bit base)")
    if s.zero.stage < 3:
        fixes.append("more GPUs (train.nproc_per_node) with train.deepspeed: zero3, which shards the weights")
    elif s.method != "qlora" and not s.zero.offload_params:
        fixes.append("train.deepspeed: zero3_offload")
    fixes.append("a GPU with more memory, or a smaller model")
    problems.append(f"model.name_or_path: {cfg.model.name_or_path} needs ~{_gib(static.per_rank['total'])} per "
                    f"rank for its weights, adapter and optimizer alone ({s.method}, {s.zero.label} over {s.world} "
                    f"rank{'s' if s.world > 1 else ''}) on a {gpu} GPU; use " + "; or ".join(fixes))
    return problems
