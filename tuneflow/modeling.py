"""Loading the base model, the tokenizer and the adapter the same way in every stage that needs them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tuneflow.config import TuneflowConfig

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
    """NF4 with double quantisation, computing in the training precision (QLoRA, arXiv 2305.14314)."""
    from transformers import BitsAndBytesConfig

    compute = DTYPES[cfg.train.precision]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        # Storing the packed 4-bit weights in the compute dtype lets ZeRO-3 shard them like any other tensor.
        bnb_4bit_quant_storage=compute,
    )


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_base(model_dir: str | Path, cfg: TuneflowConfig, quantized: bool, device_map=None, dtype=None):
    """The base model as training sees it: 4-bit NF4 for qlora when ``quantized``, else ``dtype``."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=dtype or DTYPES[cfg.train.precision],
        use_safetensors=True,
    )
    if quantized and cfg.train.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg)
    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def load_tuned(model_dir: str | Path, adapter_dir: str | Path | None, cfg: TuneflowConfig, device_map=None):
    """Base + trained weights, for evaluation: the adapter over the training-time base, or a full checkpoint."""
    if cfg.train.method in ("full", "freeze"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            adapter_dir, dtype=DTYPES[cfg.train.precision], device_map=device_map, use_safetensors=True
        )
    from peft import PeftModel

    base = load_base(model_dir, cfg, quantized=True, device_map=device_map)
    return PeftModel.from_pretrained(base, adapter_dir)
