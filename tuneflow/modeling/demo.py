"""Tiny, offline stand-ins for a Hub model and an instruction dataset, for the demo and the tests.

The model is a real transformers architecture (Llama or Qwen2) with random weights a few hundred KB in size, and a
byte-level BPE tokenizer trained with `tokenizers` on the dataset, carrying a ChatML chat template. The dataset is
a small synthetic instruction set with answers a model can learn in a few dozen steps.

    tuneflow demo-assets --out demo/assets           # writes demo/assets/{model,data/train.json}
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS_EN = "apple river stone cloud green music paper light tiger window orange silver garden rocket candle".split()
WORDS_ZH = "苹果 河流 石头 云朵 绿色 音乐 纸张 光线 老虎 窗户 橙子 银色 花园 火箭 蜡烛".split()


def make_rows(n: int, lang: str = "en", seed: int = 0) -> list[dict]:
    """Alpaca rows of three deterministic tasks (reverse words, add numbers, title a sentence)."""
    rng = random.Random(seed)
    words = WORDS_ZH if lang == "zh" else WORDS_EN
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            picked = rng.sample(words, 3)
            if lang == "zh":
                rows.append({"instruction": "把下面的词倒序排列。", "input": " ".join(picked),
                             "output": " ".join(reversed(picked))})
            else:
                rows.append({"instruction": "Reverse the order of these words.", "input": " ".join(picked),
                             "output": " ".join(reversed(picked))})
        elif kind == 1:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if lang == "zh":
                rows.append({"instruction": f"计算 {a} 加 {b}。", "input": "", "output": f"{a} 加 {b} 等于 {a + b}。"})
            else:
                rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."})
        else:
            subject, thing = rng.sample(words, 2)
            if lang == "zh":
                rows.append({"instruction": "为这段话写一个标题。",
                             "input": f"今天{subject}和{thing}一起出现在城市里。", "output": f"{subject}遇见{thing}"})
            else:
                rows.append({"instruction": "Write a short title for this text.",
                             "input": f"Today the {subject} met the {thing} in the city.",
                             "output": f"The {subject} meets the {thing}"})
    return rows


def build_tokenizer(texts: list[str], out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer, arch: str = "llama", seed: int = 0) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    vocab = (len(tokenizer) + 63) // 64 * 64  # widths that are multiples of 64 suit the 4-bit block size
    common = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (llama or qwen2)")
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)


def readable_weights(model_dir: Path) -> None:
    """safetensors writes weights 0600: make them readable by workers that run as another user (Compose)."""
    for weights in model_dir.glob("*.safetensors"):
        weights.chmod(0o644)


def build(out: Path, n_rows: int = 240, lang: str = "en", arch: str = "llama", seed: int = 0) -> dict[str, Path]:
    """Write ``out/model`` (tokenizer + weights) and ``out/data/train.json``; return both paths."""
    rows = make_rows(n_rows, lang, seed)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    texts += ["You are a helpful assistant. system user assistant"] * 4
    model_dir = out / "model"
    tokenizer = build_tokenizer(texts, model_dir)
    build_model(model_dir, tokenizer, arch, seed)
    readable_weights(model_dir)
    return {"model": model_dir, "data": data_dir / "train.json"}
