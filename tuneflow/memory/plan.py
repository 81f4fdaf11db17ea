"""Memory plan: the peak GPU memory one training rank needs, estimated from the model's config.json alone.

    tuneflow plan --config configs/my.yaml [--set train.per_device_batch_size=8] [--gpu-memory 24GiB] [--json]

Nothing but the model's ``config.json`` is read (from the local folder, or that one small file from the Hub), so the
plan runs before any weights are downloaded. The breakdown per rank:

- quantized_weights: the 4-bit NF4 decoder linears, with their double-quantisation constants (qlora);
- frozen_weights:    weights that do not train (embeddings, lm_head, norms, biases; for lora every base weight);
- adapter:           trainable parameters + their gradients (the LoRA matrices; for full/freeze the trained weights);
- optimizer:         AdamW's two moments, plus an fp32 master copy where DeepSpeed trains 16-bit parameters;
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

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tuneflow.core.config import ConfigError, TuneflowConfig, load_config, parse_size

GiB = 2**30

# bitsandbytes NF4 with double quantisation (QLoRA, arXiv 2305.14314, section 3): one absmax per block of 64 weights,
# itself quantised to 8 bits in blocks of 256 with an fp32 absmax per block; plus, per tensor, the 16-value NF4 code
# (fp32), the 256-value 8-bit code of the nested quantisation (fp32) and an fp32 offset.
NF4_BLOCK = 64
NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4
OFFSET_BYTES = 4

# The margin: CUDA context + cuBLAS workspace + NCCL buffers (fixed), and allocator fragmentation (a fraction).
MARGIN_FIXED = 3 * GiB // 4
MARGIN_FRACTION = 0.10

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_PATHS = {n: ("self_attn." if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + n
                for n in LINEAR_NAMES}
KNOWN_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")
PER_RANK_KEYS = ("quantized_weights", "frozen_weights", "adapter", "optimizer", "activations", "logits", "margin",
                 "total")


class PlanError(ValueError):
    """The model or config cannot be planned (an unknown layout, a config.json that cannot be read)."""


# ---------------------------------------------------------------------------------------------------------------
# The model's shape, from config.json


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a Llama-style decoder (Llama, Mistral, Qwen2, Qwen3)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    biases: tuple[str, ...] = ()  # linears (of LINEAR_NAMES) that carry a bias
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on q and k
    notes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], "tie_word_embeddings": config.get(
                "tie_word_embeddings", config["text_config"].get("tie_word_embeddings", False))}
        model_type = str(config.get("model_type", "?"))
        experts = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k)]
        if experts:
            raise PlanError(f"model_type {model_type!r} is a mixture of experts ({experts[0]}="
                            f"{config[experts[0]]}); the memory plan knows dense Llama-style decoders only")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if not isinstance(config.get(k), int)]
        if missing:
            raise PlanError(f"config.json of model_type {model_type!r} lacks {', '.join(missing)}; the memory plan "
                            "knows Llama-style decoders (llama, mistral, qwen2, qwen3)")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        notes = []
        if model_type not in KNOWN_LAYOUTS:
            notes.append(f"model_type {model_type!r}: assumed a Llama-style layout (q/k/v/o, gate/up/down, RMSNorm)")
        if model_type == "qwen2":
            biases = ("q_proj", "k_proj", "v_proj")
        else:
            biases = ("q_proj", "k_proj", "v_proj", "o_proj") if config.get("attention_bias") else ()
            if config.get("mlp_bias"):
                biases += ("gate_proj", "up_proj", "down_proj")
        return cls(
            model_type=model_type,
            hidden=hidden,
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            biases=biases,
            qk_norm=model_type == "qwen3",
            notes=tuple(notes),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_small_params(self) -> int:
        """Per layer, what bitsandbytes leaves in 16 bits: the two RMSNorms, biases, Qwen3's q/k norms."""
        lin = self.linears()
        return 2 * self.hidden + sum(lin[n][1] for n in self.biases) + (2 * self.head_dim if self.qk_norm else 0)

    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def total_params(self) -> int:
        return (self.embed_params + self.lm_head_params + self.hidden
                + self.layers * (self.layer_linear_params() + self.layer_small_params()))


def nf4_bytes(numel: int, storage_bytes: int = 2) -> int:
    """Bytes of one bitsandbytes NF4 weight with double quantisation: the packed 4-bit data (stored in a
    ``storage_bytes``-wide dtype, ``bnb_4bit_quant_storage``) plus its quant_state tensors."""
    packed = (numel + 1) // (2 * storage_bytes) * storage_bytes
    blocks = -(-numel // NF4_BLOCK)
    nested = -(-blocks // NESTED_BLOCK)
    return packed + blocks + 4 * nested + OFFSET_BYTES + NF4_CODE_BYTES + NESTED_CODE_BYTES


def lora_targets(shape: ModelShape, targets) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """The modules LoRA wraps, {name: (in, out)} per layer plus 'embed_tokens'/'lm_head' (once), the way peft
    matches ``target_modules``: 'all-linear' is every linear of the decoder layers (peft leaves out the output layer);
    a name matches a module whose dotted name equals it or ends with '.' + it. Returns (matched, names matching
    nothing)."""
    lin = shape.linears()
    if targets == "all-linear":
        return dict(lin), []
    matched, unmatched = {}, []
    for target in targets:
        hit = False
        for name, dims in lin.items():
            path = f"model.layers.N.{LINEAR_PATHS[name]}"
            if path.endswith("." + target):
                matched[name], hit = dims, True
        if target in ("embed_tokens", "model.embed_tokens"):
            matched["embed_tokens"], hit = (shape.vocab, shape.hidden), True
        if target == "lm_head":
            matched["lm_head"], hit = (shape.hidden, shape.vocab), True
        if not hit:
            unmatched.append(target)
    return matched, unmatched


def lora_param_count(shape: ModelShape, rank: int, targets) -> int:
    """r x (in + out) for every wrapped linear (lora_A: in -> r, lora_B: r -> out; no bias), per layer; the
    embedding's lora_embedding_A/B (r x vocab + hidden x r) and lm_head once."""
    matched, _ = lora_targets(shape, targets)
    once = {"embed_tokens", "lm_head"}
    per_layer = sum(rank * (i + o) for n, (i, o) in matched.items() if n not in once)
    return shape.layers * per_layer + sum(rank * (i + o) for n, (i, o) in matched.items() if n in once)


# ---------------------------------------------------------------------------------------------------------------
# The settings that move memory, from the tuneflow config


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
    if preset == "none":
        return ZeroSetup(False)
    if not preset.endswith(".json"):
        stage = int(preset[4])
        offload = preset == "zero3_offload"
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

    @property
    def tokens(self) -> int:
        """Tokens in the largest micro-batch: the budget (or one row of cutoff_len, which trains alone when longer),
        else batch rows of cutoff_len (the worst case: every row as long as the cutoff)."""
        if self.tokens_per_batch is not None:
            return max(self.tokens_per_batch, self.seq)
        return self.batch * self.seq

    @classmethod
    def from_config(cls, cfg: TuneflowConfig, world_size: int | None = None) -> "Settings":
        t = cfg.train
        batch = t.per_device_batch_size if isinstance(t.per_device_batch_size, int) else 1  # 'auto': searched from 1
        budget = t.tokens_per_batch if isinstance(t.tokens_per_batch, int) else None
        if t.tokens_per_batch == "auto":
            budget = cfg.prep.cutoff_len  # searched upwards from one full row
        return cls(method=t.method, precision=t.precision, batch=batch, seq=cfg.prep.cutoff_len,
                   checkpointing=t.gradient_checkpointing, zero=zero_setup(t.deepspeed),
                   world=world_size if world_size is not None else resolve_world_size(cfg),
                   lora_rank=t.lora.rank, lora_targets=t.lora.target_modules, lora_dropout=t.lora.dropout,
                   freeze_layers=t.freeze_trainable_layers, packing=t.packing, tokens_per_batch=budget,
                   loss_chunk=t.loss_chunk_tokens)


def resolve_world_size(cfg: TuneflowConfig) -> int:
    """Ranks taking part: nnodes x nproc_per_node ('auto' = the GPUs visible here, 1 without one)."""
    n = cfg.train.nproc_per_node
    if n == "auto":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(1, int(n)) * cfg.train.nnodes


def visible_gpu_memory() -> int | None:
    """Total memory of this process's GPU (LOCAL_RANK, else 0) according to torch.cuda; None without one."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory)


# ---------------------------------------------------------------------------------------------------------------
# The plan


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
    mask = tokens * tokens if s.packing else s.batch * s.seq * s.seq
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
    # AdamW: DeepSpeed keeps fp32 moments and (for 16-bit parameters) an fp32 master; torch's AdamW under the plain
    # Trainer keeps the moments in the parameters' dtype and no master.
    if z.deepspeed:
        optim_b = 8 + (4 if train_b == 2 else 0)
    else:
        optim_b = 2 * train_b

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
        for fan_in, fan_out in lin.values():
            full = nf4_bytes(fan_in * fan_out, b)
            packed = (fan_in * fan_out + 1) // (2 * b) * b
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
    optimizer = 0 if z.offload_optimizer else -(-trainable * optim_b // optim_div)
    activations = activation_bytes(shape, s, adapters_fp32, residual_bytes=b)
    logits = loss_bytes(shape, s)
    subtotal = quantized + frozen_bytes + adapter + optimizer + activations + logits
    margin = MARGIN_FIXED + int(MARGIN_FRACTION * subtotal)
    per_rank = {"quantized_weights": quantized, "frozen_weights": frozen_bytes, "adapter": adapter,
                "optimizer": optimizer, "activations": activations, "logits": logits, "margin": margin,
                "total": subtotal + margin}
    per_rank = {k: int(v) for k, v in per_rank.items()}
    params = {"total": shape.total_params(), "trainable": trainable,
              "quantized": shape.layers * layer_lin if s.method == "qlora" else 0, "frozen": frozen}
    return MemoryPlan(per_rank, gpu_memory, s.batch, s, shape, params, notes)


def plan(cfg: TuneflowConfig, model_config: dict, gpu_memory: int | None = None, *,
         world_size: int | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` for the model described by ``model_config`` (its config.json as a dict)."""
    return estimate(ModelShape.from_config(model_config), Settings.from_config(cfg, world_size), gpu_memory)


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
    fallback = {"per_device_batch_size": AUTO_FALLBACK_ROWS, "tokens_per_batch": AUTO_FALLBACK_ROWS * cfg.prep.cutoff_len}
    updates, notes = {}, []
    for key, find in (("per_device_batch_size", largest_batch_that_fits), ("tokens_per_batch", largest_tokens_that_fit)):
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


# ---------------------------------------------------------------------------------------------------------------
# config.json, the command


def read_model_config(cfg: TuneflowConfig) -> dict:
    """The model's config.json: from the local folder, or that one file from the Hub (revision model.revision)."""
    name = cfg.model.name_or_path
    local = Path(name).expanduser()
    if local.exists():
        path = local / "config.json" if local.is_dir() else local
        if not path.is_file():
            raise PlanError(f"model.name_or_path: {name} has no config.json; it is not a transformers model")
    elif name.startswith(("/", ".", "~")):
        raise PlanError(f"model.name_or_path: no such file or folder: {name}")
    else:
        from huggingface_hub import hf_hub_download

        from tuneflow.sources.hub import Problem, hub_call, hub_token, locate

        logger = logging.getLogger("tuneflow.plan")
        try:
            token = hub_token(cfg)
            src = locate(name, cfg.model.revision, "model", logger, token)  # an unreachable Hub is named at once
            path = Path(hub_call(lambda: hf_hub_download(name, "config.json", revision=src.sha or src.revision,
                                                         token=token), src, logger, retry=False))
        except Problem as exc:
            raise PlanError(str(exc)) from None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"model.name_or_path: {name}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise PlanError(f"model.name_or_path: {name}: config.json is not a JSON object")
    return config


LINES = (
    ("quantized_weights", "4-bit NF4 weights (+ double-quant constants)"),
    ("frozen_weights", "frozen weights"),
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
    optim = "AdamW, 2 fp32 moments" + (" + fp32 master" if s.zero.deepspeed and s.precision != "fp32" else "") \
        if s.zero.deepspeed else "AdamW, 2 moments in the parameters' dtype"
    labels = dict(LINES)
    labels["frozen_weights"] += f" ({frozen_what})"
    labels["adapter"] += f" ({p.params['trainable'] / 1e6:,.1f}M {'LoRA ' if s.method in ('qlora', 'lora') else ''}params)"
    labels["optimizer"] += f" ({optim})"
    labels["logits"] += (f" of {min(s.loss_chunk, s.tokens)} tokens at a time + labelled hidden states"
                         if s.loss_chunk else " of every token, fp32")
    micro = (f"up to {s.tokens} tokens (train.tokens_per_batch {s.tokens_per_batch}, rows of <= {s.seq})"
             if s.tokens_per_batch is not None else f"{s.batch} x {s.seq} tokens" + (" packed" if s.packing else ""))
    loss = f"loss chunked by {s.loss_chunk} tokens" if s.loss_chunk else "full-logits loss"
    head = (f"memory plan per rank: {model} ({shape.model_type}, {p.params['total'] / 1e9:.2f}B params), {s.method}, "
            f"{'auto (bf16, fp16 before Ampere)' if s.precision == 'auto' else s.precision}, {s.zero.label} over "
            f"{s.world} rank{'s' if s.world > 1 else ''}\n"
            f"  micro-batch {micro}, gradient checkpointing {'on' if s.checkpointing else 'off'}, {loss}")
    width = max(len(v) for v in labels.values()) + 2
    rows = [head] + [f"  {labels[k]:<{width}}{p.per_rank[k] / GiB:9.2f} GiB" for k, _ in LINES]
    rows.append(f"  {'total':<{width}}{p.per_rank['total'] / GiB:9.2f} GiB")
    if p.gpu_memory is None:
        rows.append("GPU memory unknown (no GPU visible, train.gpu_memory unset): pass --gpu-memory, e.g. --gpu-memory 24GiB")
    else:
        verdict = "fits" if p.fits else "does NOT fit"
        key = "tokens_per_batch" if s.tokens_per_batch is not None else "per_device_batch_size"
        extra = f"; the largest {key} that fits is {largest}" if largest else ""
        rows.append(f"GPU memory {p.gpu_memory / GiB:.2f} GiB: {verdict}{extra}")
    rows += [f"note: {n}" for n in p.notes]
    return "\n".join(rows)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. 24GiB, 80GB)") from None


def add_plan_command(subparsers) -> argparse.ArgumentParser:
    """Add ``tuneflow plan`` to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="estimate peak GPU memory per rank (reads only the model's config.json)",
                              description="Estimate the peak GPU memory per training rank from the model's "
                                          "config.json alone; see docs/memory.md for the formulas. Exit status 1 "
                                          "when it does not fit the GPU.")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.per_device_batch_size=8 (repeatable)")
    p.add_argument("--gpu-memory", type=_size, metavar="SIZE",
                   help="memory of one GPU, e.g. 24GiB or 80GB (default: train.gpu_memory, else the visible GPU's, "
                        "via torch.cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON line (bytes) instead of the table")
    p.set_defaults(fn=cmd_plan)
    return p


def cmd_plan(args) -> int:
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"tuneflow: {exc}", file=sys.stderr)
        return 2
    try:
        model_config = read_model_config(cfg)
        shape = ModelShape.from_config(model_config)
    except PlanError as exc:
        print(f"tuneflow: {exc}", file=sys.stderr)
        return 2
    gpu_memory = args.gpu_memory
    if gpu_memory is None:
        gpu_memory = parse_size(cfg.train.gpu_memory) if cfg.train.gpu_memory else visible_gpu_memory()
    world = resolve_world_size(cfg)
    cfg, chosen = resolve_auto_batches(cfg, model_config, gpu_memory, world_size=world)
    p = estimate(shape, Settings.from_config(cfg, world), gpu_memory)
    problems = plan_problems(cfg, model_config, gpu_memory, world_size=world)
    if args.json:
        print(json.dumps(p.to_json()), flush=True)
    else:
        find = largest_tokens_that_fit if cfg.train.tokens_per_batch is not None else largest_batch_that_fits
        largest = find(cfg, model_config, gpu_memory, world_size=world) if gpu_memory else None
        print(render(p, cfg.model.name_or_path, largest), flush=True)
    for line in chosen:
        print(f"tuneflow: {line}", file=sys.stderr)
    for problem in problems:
        print(f"tuneflow: {problem}", file=sys.stderr)
    return 1 if p.fits is False or problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneflow")
    add_plan_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)


if __name__ == "__main__":  # python -m tuneflow.memory.plan --config X [--gpu-memory 24GiB] [--json]
    sys.exit(main())
