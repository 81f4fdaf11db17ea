"""The memory plan: the peak GPU memory one training rank needs, estimated from the model's config.json alone.

    tuneflow plan --config configs/my.yaml [--set train.per_device_batch_size=8] [--gpu-memory 24GiB] [--json]

Nothing but the model's ``config.json`` is read (from the local folder, or that one small file from the Hub), so the
plan runs before any weights are downloaded. The breakdown per rank:

- quantized_weights: the quantised decoder linears of qlora (train.quantization: 4-bit NF4 or FP4 with their
                     quantisation constants, or 8-bit with a scale per row);
- frozen_weights:    weights that do not train (embeddings, lm_head, norms, biases; for lora every base weight);
- adapter:           trainable parameters + their gradients (the LoRA matrices; for full/freeze the trained weights);
- optimizer:         the states of train.optimizer (AdamW: two moments; 8-bit: a quarter of that), plus an fp32 master
                     copy where DeepSpeed trains 16-bit parameters;
- activations:       what the forward pass keeps for backward (an estimate, see docs/memory.md);
- logits:            the loss: one chunk of labelled tokens x vocabulary (the chunked loss, the default), or the
                     micro-batch's tokens x vocabulary in fp32 (train.loss_chunk_tokens: 0);
- margin:            CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation.

Every formula, and what it rests on, is in docs/memory.md. The static lines (weights) are checked in the tests against
the bytes of a real model loaded with bitsandbytes; the activations are not calibrated until measured on a GPU.
This module imports pydantic (through tuneflow.core.config) only; torch, transformers and huggingface_hub are imported
inside the functions that need them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tuneflow.core.config import DEEPSPEED_PRESETS, TuneflowConfig
from tuneflow.memory.shape import (
    LINEAR_NAMES,
    GiB,
    ModelShape,
    lora_param_count,
    lora_targets,
    packed_bytes,
    quantized_bytes,
)

# The margin: CUDA context + cuBLAS workspace + NCCL buffers (fixed), and allocator fragmentation (a fraction).
MARGIN_FIXED = 3 * GiB // 4
MARGIN_FRACTION = 0.10


@dataclass(frozen=True)
class ZeroSetup:
    deepspeed: bool  # DeepSpeed runs at all (it casts parameters to the 16-bit precision and keeps fp32 masters)
    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    note: str = ""

    @property
    def label(self) -> str:
        if not self.deepspeed:
            return "no DeepSpeed"
        off = [w for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return f"ZeRO-{self.stage}" + (f" (offload {'+'.join(off)} to CPU)" if off else "")


def zero_setup(preset: str) -> ZeroSetup:
    """What a ``train.deepspeed`` value means for memory (the presets of tuneflow.training.deepspeed, or a JSON)."""
    if not preset.endswith(".json"):
        if DEEPSPEED_PRESETS[preset] is None:
            return ZeroSetup(False)
        stage, offload = DEEPSPEED_PRESETS[preset]
        return ZeroSetup(True, stage, offload, offload)
    try:
        ds = json.loads(Path(preset).read_text())
    except (OSError, ValueError) as exc:
        return ZeroSetup(True, 0, note=f"train.deepspeed: {preset} could not be read ({exc}); planned as ZeRO-0")
    zero = ds.get("zero_optimization") or {}
    device = lambda key: str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")  # noqa: E731
    return ZeroSetup(True, int(zero.get("stage", 0) or 0), device("offload_optimizer"), device("offload_param"))


@dataclass(frozen=True)
class Settings:
    method: str
    precision: str
    batch: int
    seq: int
    checkpointing: bool
    zero: ZeroSetup
    world: int
    lora_rank: int
    lora_targets: object
    lora_dropout: float
    freeze_layers: int
    packing: bool = True
    tokens_per_batch: int | None = None  # the token budget (train.tokens_per_batch); None: `batch` rows
    loss_chunk: int = 256  # train.loss_chunk_tokens; 0: the full-logits loss
    optimizer: str = "adamw_torch_fused"  # train.optimizer
    quant_bits: int = 4  # train.quantization (qlora)
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_compute: str = "auto"
    dora: bool = False  # train.lora.use_dora
    modules_to_save: tuple = ()  # train.lora.modules_to_save
    pairs: bool = False  # train.objective dpo, orpo: a row is a pair, two padded sequences (chosen, rejected)
    reference: bool = False  # dpo over full or freeze: a frozen copy of the model beside it (an adapter: none)

    @property
    def sequences(self) -> int:
        """Sequences in a padded micro-batch: its rows, or both answers of each of its pairs."""
        return self.batch * (2 if self.pairs else 1)

    @property
    def tokens(self) -> int:
        """Tokens in the largest micro-batch: the budget (or one row of cutoff_len, which trains alone when longer),
        else batch rows of cutoff_len (the worst case: every row as long as the cutoff)."""
        if self.tokens_per_batch is not None:
            return max(self.tokens_per_batch, self.seq)
        return self.sequences * self.seq

    @classmethod
    def from_config(cls, cfg: TuneflowConfig, world_size: int | None = None) -> "Settings":
        t = cfg.train
        batch = t.per_device_batch_size if isinstance(t.per_device_batch_size, int) else 1  # 'auto': searched from 1
        budget = t.tokens_per_batch if isinstance(t.tokens_per_batch, int) else None
        if t.tokens_per_batch == "auto":
            budget = cfg.prep.cutoff_len  # searched upwards from one full row
        dpo = t.objective != "sft"  # TRL pads each pair's two sequences and computes the full logits' loss
        return cls(method=t.method, precision=t.precision, batch=batch, seq=cfg.prep.cutoff_len, pairs=dpo,
                   reference=t.objective == "dpo" and t.method in ("full", "freeze"),
                   checkpointing=t.gradient_checkpointing, zero=zero_setup(t.deepspeed),
                   world=world_size if world_size is not None else resolve_world_size(cfg),
                   lora_rank=t.lora.rank, lora_targets=t.lora.target_modules, lora_dropout=t.lora.dropout,
                   freeze_layers=t.freeze_trainable_layers, packing=t.packing and not dpo, tokens_per_batch=budget,
                   loss_chunk=0 if dpo else t.loss_chunk_tokens, optimizer=t.optimizer, quant_bits=t.quantization.bits,
                   quant_type=t.quantization.type, double_quant=t.quantization.double_quant,
                   quant_compute=t.quantization.compute_dtype, dora=t.lora.use_dora,
                   modules_to_save=tuple(t.lora.modules_to_save))


def resolve_nproc(nproc: int | str) -> int:
    """train.nproc_per_node on this machine: 'auto' = the GPUs visible here, 1 without one."""
    if nproc != "auto":
        return max(1, int(nproc))
    import torch

    return max(1, torch.cuda.device_count())


def resolve_world_size(cfg: TuneflowConfig) -> int:
    """Ranks taking part: nnodes x nproc_per_node."""
    return resolve_nproc(cfg.train.nproc_per_node) * cfg.train.nnodes


def visible_gpu_memory() -> int | None:
    """Total memory of this process's GPU (LOCAL_RANK, else 0) according to torch.cuda; None without one."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory)


@dataclass
class MemoryPlan:
    per_rank: dict[str, int]
    gpu_memory: int | None
    per_device_batch_size: int
    settings: Settings
    shape: ModelShape
    params: dict[str, int] = field(default_factory=dict)  # counts: total, quantized, frozen, trainable
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.per_rank["total"] <= self.gpu_memory

    def to_json(self) -> dict:
        return {"per_rank": dict(self.per_rank), "gpu_memory": self.gpu_memory, "fits": self.fits,
                "per_device_batch_size": self.per_device_batch_size,
                "tokens_per_batch": self.settings.tokens_per_batch}


# train.optimizer -> (bytes of state per trained parameter, what they are). None: two moments in the dtype of the
# parameters the optimizer steps (torch's AdamW). bitsandbytes keeps its 32-bit states in fp32 whatever the
# parameters' dtype, and its 8-bit ones blockwise-quantised (1 byte each + an fp32 scale per 256: ~1.02).
OPTIMIZER_STATES: dict[str, tuple[float | None, str]] = {
    "adamw_torch_fused": (None, "AdamW, 2 moments in the parameters' dtype"),
    "adamw_torch": (None, "AdamW, 2 moments in the parameters' dtype"),
    "adamw_8bit": (2.03, "AdamW, 2 moments of 8 bits"),
    "paged_adamw_8bit": (2.03, "paged AdamW, 2 moments of 8 bits"),
    "paged_adamw_32bit": (8, "paged AdamW, 2 fp32 moments"),
    "lion_8bit": (1.02, "Lion, 1 moment of 8 bits"),
    "paged_lion_8bit": (1.02, "paged Lion, 1 moment of 8 bits"),
    "lion_32bit": (4, "Lion, 1 fp32 moment"),
    "paged_lion_32bit": (4, "paged Lion, 1 fp32 moment"),
    "adafactor": (0, "Adafactor, factored second moments (rows + columns: negligible)"),
    "sgd": (0, "SGD, no state"),
}


def optimizer_state_bytes(optimizer: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trained parameter, for parameters of ``param_bytes`` bytes as it steps them."""
    per = OPTIMIZER_STATES[optimizer][0]
    return 2 * param_bytes if per is None else per


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # 'auto' on a GPU: bf16, or fp16 before Ampere


def activation_bytes(shape: ModelShape, s: Settings, adapters_fp32: bool, residual_bytes: int) -> int:
    """Activations kept for backward on one rank (see docs/memory.md for each term)."""
    b = _bytes(s.precision)
    h, q, i = shape.hidden, shape.heads * shape.head_dim, shape.intermediate
    norm = 4 * h + 2 * b * h  # HF RMSNorm: the fp32 upcast input, the normalised 16-bit tensor, its output
    attention = 5 * b * q + 4 * shape.heads  # q, k, v (repeated to all heads), SDPA output + its copy for o_proj, lse
    mlp = 4 * b * i  # SwiGLU: gate output, SiLU output, up output, their product
    per_token_layer = 2 * norm + attention + mlp
    if s.method in ("qlora", "lora"):
        matched, _ = lora_targets(shape, s.lora_targets)
        for name, (fan_in, _out) in matched.items():
            if name in ("embed_tokens", "lm_head"):
                continue
            if s.lora_dropout > 0:
                extra = (1 + b) * fan_in  # dropout mask (bool) + the dropped-out input lora_A keeps
            else:
                extra = b * fan_in if adapters_fp32 else 0  # autocast's 16-bit copy of the fp32-cast input
            per_token_layer += extra + b * s.lora_rank  # + lora_A's output, which lora_B keeps
    tokens = s.tokens
    if s.checkpointing:
        # Each decoder layer keeps only its input; backward recomputes one layer at a time.
        layers = tokens * (shape.layers * residual_bytes * h + per_token_layer)
    else:
        layers = tokens * shape.layers * per_token_layer
    final_norm = tokens * norm
    # The 4-D boolean mask transformers builds for SDPA: per row when padded (B x S x S); when packed, one
    # block-diagonal mask over the whole packed sequence (tokens x tokens). flash-attention builds none.
    mask = tokens * tokens if s.packing else s.sequences * s.seq * s.seq
    dequant = 0
    if s.method == "qlora":  # bitsandbytes dequantises one weight at a time to the compute dtype for its matmul
        dequant = max(a * o for a, o in shape.linears().values()) * b
    return layers + final_norm + mask + dequant


def loss_bytes(shape: ModelShape, s: Settings) -> int:
    """The loss's peak beyond the activations (see docs/memory.md). Chunked (tuneflow.training.loss): the labelled
    positions' hidden states (kept as the chunks' inputs, at most every token) plus one chunk's logits alive at
    once: the 16-bit projection, its fp32 copy, the log-softmax and, in backward, its fp32 gradient. Full: the
    micro-batch's logits in fp32."""
    if s.loss_chunk > 0:
        return s.tokens * shape.hidden * _bytes(s.precision) + min(s.loss_chunk, s.tokens) * shape.vocab * (
            _bytes(s.precision) + 12)
    return s.tokens * shape.vocab * 4


def estimate(shape: ModelShape, s: Settings, gpu_memory: int | None = None) -> MemoryPlan:
    """The plan for a model shape and settings: pure arithmetic."""
    b = _bytes(s.precision)
    z, world = s.zero, s.world
    notes = list(shape.notes) + ([z.note] if z.note else [])
    sixteen = s.precision != "fp32"

    # What each weight is stored as during training: frozen weights stay in the training precision as loaded (the
    # worker does not call prepare_model_for_kbit_training, which would upcast every non-4-bit weight to fp32).
    frozen_b = b
    #  LoRA: peft creates the adapters in fp32 (autocast_adapter_dtype); DeepSpeed casts them to 16 bits.
    #  full/freeze: the weights stay in the dtype they were loaded in (the training precision).
    if s.method in ("qlora", "lora"):
        train_b = b if (z.deepspeed and sixteen) else 4
    else:
        train_b = b
    adapters_fp32 = train_b == 4
    # DeepSpeed steps fp32 copies (a master, for 16-bit parameters) with the Trainer's optimizer; the plain Trainer
    # steps the parameters themselves (AdamW's moments in their dtype, no master).
    if z.deepspeed:
        optim_b = optimizer_state_bytes(s.optimizer, 4) + (4 if train_b == 2 else 0)
    else:
        optim_b = optimizer_state_bytes(s.optimizer, train_b)

    lin = shape.linears()
    layer_lin = shape.layer_linear_params()
    layer_small = shape.layer_small_params()
    layer_all = layer_lin + layer_small
    outside = shape.embed_params + shape.lm_head_params + shape.hidden  # embeddings, lm_head, final norm

    quant_sharded = quant_fixed = 0
    quant_layer = 0
    frozen = trainable = 0
    frozen_unit = trainable_unit = 0  # the largest piece ZeRO-3 gathers at once, in elements
    if s.method == "qlora":
        storage = b if s.quant_compute == "auto" else _bytes(s.quant_compute)  # bnb_4bit_quant_storage
        for fan_in, fan_out in lin.values():
            full = quantized_bytes(fan_in * fan_out, fan_out, s.quant_bits, s.double_quant, storage)
            packed = packed_bytes(fan_in * fan_out, s.quant_bits, storage)
            quant_sharded += shape.layers * packed
            quant_fixed += shape.layers * (full - packed)
            quant_layer += packed
        frozen = outside + shape.layers * layer_small
        frozen_unit = max(shape.embed_params, shape.lm_head_params, layer_small)
    elif s.method == "lora":
        frozen = outside + shape.layers * layer_all
        frozen_unit = max(shape.embed_params, shape.lm_head_params, layer_all)
    elif s.method == "full":
        trainable = outside + shape.layers * layer_all
        trainable_unit = max(shape.embed_params, shape.lm_head_params, layer_all)
    else:  # freeze: the top freeze_trainable_layers decoder layers train (tuneflow.training.worker.build_model)
        k = min(s.freeze_layers, shape.layers)
        trainable = k * layer_all
        frozen = outside + (shape.layers - k) * layer_all
        trainable_unit = layer_all if k else 0
        frozen_unit = max(shape.embed_params, shape.lm_head_params, layer_all if k < shape.layers else 0)
    if s.method in ("qlora", "lora"):
        trainable = lora_param_count(shape, s.lora_rank, s.lora_targets)
        matched, unmatched = lora_targets(shape, s.lora_targets)
        if s.dora:  # a magnitude per output of each adapted linear
            trainable += sum(o * (1 if n in ("embed_tokens", "lm_head") else shape.layers) for n, (_, o) in
                             matched.items())
        # train.lora.modules_to_save: a trained copy of each beside the frozen original
        trainable += sum(params for name, params in (("embed_tokens", shape.embed_params),
                                                     ("lm_head", shape.lm_head_params or shape.embed_params))
                         if name in s.modules_to_save)
        trainable_unit = sum(s.lora_rank * (i + o) for n, (i, o) in matched.items()
                             if n not in ("embed_tokens", "lm_head"))
        if unmatched:
            notes.append(f"train.lora.target_modules: {', '.join(unmatched)} match no module of a {shape.model_type} "
                         f"layer ({', '.join(LINEAR_NAMES)})")

    # ZeRO: stage 1 shards optimizer states, 2 also gradients, 3 also parameters (frozen ones included).
    param_div = world if z.stage >= 3 else 1
    grad_div = world if z.stage >= 2 else 1
    optim_div = world if z.stage >= 1 else 1

    def params_on_gpu(total_bytes: int, unit_bytes: int) -> int:
        if z.stage < 3:
            return total_bytes
        gathered = unit_bytes  # one module's full weights are gathered for its forward/backward
        return gathered + (0 if z.offload_params else -(-total_bytes // param_div))

    quantized = quant_fixed + params_on_gpu(quant_sharded, quant_layer) if s.method == "qlora" else 0
    frozen_bytes = params_on_gpu(frozen * frozen_b, frozen_unit * frozen_b)
    grads = -(-trainable * train_b // grad_div)
    if not z.deepspeed and world > 1:
        grads *= 2  # DDP's gradient buckets hold a second copy
    adapter = params_on_gpu(trainable * train_b, trainable_unit * train_b) + grads
    optimizer = 0 if z.offload_optimizer else math.ceil(trainable * optim_b / optim_div)
    # DPO's reference for full/freeze: TRL loads the model again, in the training precision, frozen (ZeRO-3 shards
    # it as it does the policy); its forward keeps no activations.
    reference = params_on_gpu(shape.total_params() * b, max(shape.embed_params, shape.lm_head_params, layer_all) * b
                              ) if s.reference else 0
    activations = activation_bytes(shape, s, adapters_fp32, residual_bytes=b)
    logits = loss_bytes(shape, s)
    subtotal = quantized + frozen_bytes + reference + adapter + optimizer + activations + logits
    margin = MARGIN_FIXED + int(MARGIN_FRACTION * subtotal)
    per_rank = {"quantized_weights": quantized, "frozen_weights": frozen_bytes, "reference_weights": reference,
                "adapter": adapter, "optimizer": optimizer, "activations": activations, "logits": logits,
                "margin": margin, "total": subtotal + margin}
    per_rank = {k: int(v) for k, v in per_rank.items()}
    params = {"total": shape.total_params(), "trainable": trainable,
              "quantized": shape.layers * layer_lin if s.method == "qlora" else 0, "frozen": frozen}
    return MemoryPlan(per_rank, gpu_memory, s.batch, s, shape, params, notes)


def plan(cfg: TuneflowConfig, model_config: dict, gpu_memory: int | None = None, *,
         world_size: int | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` for the model described by ``model_config`` (its config.json as a dict)."""
    return estimate(ModelShape.from_config(model_config), Settings.from_config(cfg, world_size), gpu_memory)
