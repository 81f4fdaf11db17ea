"""Loading the base model, the tokenizer and the adapter the same way in every stage that needs them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tuneflow.core.config import TuneflowConfig
from tuneflow.modeling.precision import compute_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tokenizer(model_dir: str | Path, cfg: TuneflowConfig, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.chat_template:
        tok.chat_template = cfg.model.chat_template
    if not tok.chat_template:
        raise ValueError(
            f"{model_dir}: the tokenizer has no chat template; set model.chat_template in the config"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def quantization_config(cfg: TuneflowConfig):
    """train.quantization for bitsandbytes: 4-bit NF4 with double quantisation by default (QLoRA, arXiv 2305.14314),
    computing in the training precision; or FP4, single quantisation, 8-bit LLM.int8 weights."""
    from transformers import BitsAndBytesConfig

    q = cfg.train.quantization
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype(cfg) if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        # Storing the packed 4-bit weights in the compute dtype lets ZeRO-3 shard them like any other tensor.
        bnb_4bit_quant_storage=compute,
    )


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_pretrained(folder: str | Path, cfg: TuneflowConfig, dtype: torch.dtype, device_map=None, **kwargs):
    """Every ``from_pretrained`` of a causal LM in tuneflow: safetensors only, custom code only when trusted, the
    attention kernel of model.attn_implementation."""
    from transformers import AutoModelForCausalLM

    from tuneflow.modeling.precision import attention

    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=attention(cfg), **kwargs
    )


def load_base(model_dir: str | Path, cfg: TuneflowConfig, quantized: bool, device_map=None, dtype=None):
    """The base model as training sees it: 4-bit NF4 for qlora when ``quantized``, else ``dtype``."""
    kwargs = {}
    if quantized and cfg.train.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg)
    return load_pretrained(model_dir, cfg, dtype or compute_dtype(cfg), device_map, **kwargs)


def load_trained(model_dir: str | Path, weights_dir: str | Path, cfg: TuneflowConfig, device_map=None, base=None):
    """Base + trained weights as training left them: the adapter over the base as trained (NF4 for qlora; pass
    ``base`` to reuse one already loaded), or the whole saved model (full, freeze)."""
    if cfg.train.method in ("full", "freeze"):
        return load_pretrained(weights_dir, cfg, compute_dtype(cfg), device_map)
    from peft import PeftModel

    if base is None:
        base = load_base(model_dir, cfg, quantized=True, device_map=device_map)
    return PeftModel.from_pretrained(base, weights_dir)


def load_merged(model_dir: str | Path, weights_dir: str | Path, cfg: TuneflowConfig, dtype: torch.dtype, device_map):
    """A standalone model in ``dtype``. For qlora the adapter is merged into the *dequantised* NF4 base (the weights
    it was trained against), never into the original 16-bit weights, which would shift every answer a little."""
    if cfg.train.method in ("full", "freeze"):
        return load_pretrained(weights_dir, cfg, dtype, device_map)
    from peft import PeftModel

    base = load_base(model_dir, cfg, quantized=True, device_map=device_map)
    if cfg.train.method == "qlora":
        base = base.dequantize()
    return PeftModel.from_pretrained(base.to(dtype), weights_dir).merge_and_unload()
