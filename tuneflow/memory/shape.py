"""The model's shape from its config.json alone (`tuneflow.sources.model_config` reads it), and the bytes of its NF4
weights and LoRA matrices: what the memory plan counts. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneflow.core.errors import TuneflowError

GiB = 2**30

# bitsandbytes NF4 with double quantisation (QLoRA, arXiv 2305.14314, section 3): one absmax per block of 64 weights,
# itself quantised to 8 bits in blocks of 256 with an fp32 absmax per block; plus, per tensor, the 16-value NF4 code
# (fp32), the 256-value 8-bit code of the nested quantisation (fp32) and an fp32 offset.
NF4_BLOCK = 64
NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4
OFFSET_BYTES = 4

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_PATHS = {n: ("self_attn." if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp.") + n
                for n in LINEAR_NAMES}
KNOWN_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")


class PlanError(TuneflowError, ValueError):
    """The model or config cannot be planned (an unknown layout, a config.json that cannot be read)."""


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
    return quantized_bytes(numel, 0, 4, True, storage_bytes)


def packed_bytes(numel: int, bits: int, storage_bytes: int = 2) -> int:
    """The quantised data alone: 4-bit values packed two per byte into ``storage_bytes``-wide elements, or int8."""
    return numel if bits == 8 else (numel + 1) // (2 * storage_bytes) * storage_bytes


def quantized_bytes(numel: int, fan_out: int, bits: int = 4, double_quant: bool = True, storage_bytes: int = 2) -> int:
    """Bytes of one bitsandbytes weight as loaded: 8-bit (LLM.int8: int8 values + an fp32 scale per output row), or
    4-bit NF4/FP4 (same layout) with its quant_state: an absmax per block of 64 (fp32, or with double quantisation
    8-bit with an fp32 absmax per 256 blocks and an offset), the 16-value code and the nested code."""
    if bits == 8:
        return numel + 4 * fan_out
    blocks = -(-numel // NF4_BLOCK)
    if not double_quant:
        return packed_bytes(numel, 4, storage_bytes) + 4 * blocks + NF4_CODE_BYTES
    nested = -(-blocks // NESTED_BLOCK)
    return (packed_bytes(numel, 4, storage_bytes) + blocks + 4 * nested + OFFSET_BYTES + NF4_CODE_BYTES
            + NESTED_CODE_BYTES)


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
