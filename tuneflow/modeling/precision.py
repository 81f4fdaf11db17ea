"""What depends on the machine that computes: `train.precision: auto`, resolved by one rule,

    CUDA with bf16 (Ampere or newer)                     -> bf16
    older CUDA                                           -> fp16 with loss scaling (fp32 for full/freeze without
                                                            DeepSpeed, which needs an fp32 master copy)
    a CPU that runs bf16 matmuls natively (AVX512-BF16, AMX) -> bf16
    any other CPU                                        -> fp32

On a CPU without native bf16 (AVX2 only), bf16 is emulated and runs 30-40x slower than fp32. For qlora the weights stay
4-bit NF4 whatever the choice: only bitsandbytes' compute dtype follows. The resolved precision changes speed, not
the experiment, so it is no part of the config hash. Also `model.attn_implementation: auto` (flash attention 2 where
it runs, else sdpa) and what cannot train on a machine (`machine_problem`: paged optimizers without CUDA, flash
attention 2 without it or flash-attn, FlexAttention on a CPU). The machine is passed as data (`Machine`), so every
branch of the rules is testable without the hardware.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

EMULATED_BF16 = "bf16 is emulated there and runs 30-40x slower than fp32"


@dataclass(frozen=True)
class Machine:
    gpu: str | None  # the CUDA device's name; None: computing on the CPU
    gpu_bf16: bool = False
    cpu: str = ""  # torch.backends.cpu.get_cpu_capability(), e.g. AVX2, AVX512
    cpu_bf16: bool = False  # oneDNN runs bf16 natively: AVX512-BF16 or AMX, and oneDNN allowed to use it
    flash_attn: bool = False  # the flash-attn package is installed

    def describe(self) -> str:
        if self.gpu:
            return f"GPU {self.gpu} ({'with' if self.gpu_bf16 else 'without'} bf16)"
        return f"CPU {self.cpu or '?'} ({'native' if self.cpu_bf16 else 'no native'} bf16)"


@functools.cache
def this_machine() -> Machine:
    import importlib.util

    import torch

    if torch.cuda.is_available():
        return Machine(gpu=torch.cuda.get_device_name(), gpu_bf16=torch.cuda.is_bf16_supported(),
                       flash_attn=importlib.util.find_spec("flash_attn") is not None)
    flags = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    # The CPU's flags say what the chip has; oneDNN's answer says whether the matmuls will use it (ONEDNN_MAX_CPU_ISA
    # can forbid it). Both must agree.
    native = bool(flags.get("avx512_bf16") or flags.get("amx_bf16")) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return Machine(gpu=None, cpu=torch.backends.cpu.get_cpu_capability(), cpu_bf16=native)


@dataclass(frozen=True)
class Resolved:
    precision: str  # bf16 | fp16 | fp32
    reason: str  # one line: what was asked, what this machine is, what was chosen
    warning: str | None = None  # an explicit choice that works here but slowly


def resolve(requested: str, machine: Machine, method: str = "qlora", deepspeed: str = "none") -> Resolved:
    """The compute precision for ``requested`` (auto | bf16 | fp16 | fp32) on ``machine``."""
    where = machine.describe()
    if requested != "auto":
        warning = None
        if requested == "bf16" and not machine.gpu and not machine.cpu_bf16:
            warning = (f"train.precision: bf16 on {where}: {EMULATED_BF16}; it trains, but set train.precision: auto "
                       "(fp32 here) to train fast")
        return Resolved(requested, f"precision {requested} (set in the config) on {where}", warning)
    if machine.gpu:
        if machine.gpu_bf16:
            choice = "bf16"
        elif method in ("full", "freeze") and deepspeed == "none":
            choice = "fp32"  # fp16 without DeepSpeed has no fp32 master copy of fully trained weights
        else:
            choice = "fp16"
    else:
        choice = "bf16" if machine.cpu_bf16 else "fp32"
    why = "" if choice == "bf16" or machine.gpu else f"; {EMULATED_BF16}"
    return Resolved(choice, f"precision auto -> {choice} on {where}{why}")


def resolved(cfg, machine: Machine | None = None) -> Resolved:
    """``cfg.train.precision`` resolved on ``machine`` (default: this one)."""
    t = cfg.train
    return resolve(t.precision, machine or this_machine(), t.method, t.deepspeed)


def compute_dtype(cfg):
    """The torch dtype models compute in on this machine for ``cfg``."""
    from tuneflow.modeling.load import DTYPES

    return DTYPES[resolved(cfg).precision]


def attention(cfg, machine: Machine | None = None) -> str:
    """model.attn_implementation on ``machine``: auto = flash_attention_2 on CUDA with flash-attn, else sdpa. Where
    flash attention 2 cannot run (evaluate or export on a CPU machine after training on a GPU), sdpa computes the same;
    training never gets here with it (machine_problem)."""
    machine = machine or this_machine()
    flash = bool(machine.gpu and machine.flash_attn)
    requested = cfg.model.attn_implementation
    if requested == "auto" or (requested == "flash_attention_2" and not flash):
        return "flash_attention_2" if flash else "sdpa"
    return requested


def machine_problem(cfg, machine: Machine | None = None) -> str | None:
    """Why the config cannot train on ``machine`` (default: this one), or None. Paged optimizers page through CUDA
    unified memory (bitsandbytes falls back to unpaged states without CUDA; tuneflow says so instead); flash
    attention 2 needs CUDA and the flash-attn package; torch's FlexAttention has no backward on the CPU."""
    optimizer, attn = cfg.train.optimizer, cfg.model.attn_implementation
    machine = machine or this_machine()
    where = machine.describe()
    if optimizer.startswith("paged_") and not machine.gpu:
        return (f"train.optimizer: {optimizer} pages its states through CUDA memory, and {where} has no CUDA GPU; "
                f"use {optimizer.removeprefix('paged_')} here (the same states, unpaged)")
    if attn == "flash_attention_2" and not (machine.gpu and machine.flash_attn):
        need = "the flash-attn package (pip install flash-attn)" if machine.gpu else "a CUDA GPU"
        return f"model.attn_implementation: flash_attention_2 needs {need}, which {where} lacks; use auto or sdpa"
    if attn == "flex_attention" and not machine.gpu:
        return (f"model.attn_implementation: flex_attention does not train on {where} (torch's FlexAttention has no "
                "backward on the CPU); use auto or sdpa")
    return None
