"""The plain script users would write instead of tuneflow: TRL's SFTTrainer + PEFT + bitsandbytes, TRL's defaults.

Run by bench/train.py (as its own process, with trl on the path) on the same model, rows, LoRA settings,
quantisation, micro-batch, steps, seed and learning rate as tuneflow's worker; prints one JSON line. Besides what
a fair comparison must fix, only `include_num_input_tokens_seen` is set, to count real tokens as tuneflow does.
TRL is not a tuneflow dependency.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="Alpaca rows (instruction, output)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: TRL's default, as users run it; fp32: the same script computing in fp32")
    args = parser.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    rows = json.load(open(args.data, encoding="utf-8"))
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["instruction"]},
                                            {"role": "assistant", "content": r["output"]}]} for r in rows])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                           gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                           max_length=1024, seed=42, report_to="none", save_strategy="no", logging_steps=1,
                           use_cpu=True, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                           bf16=args.dtype == "bf16")
        trainer = SFTTrainer(model=model, args=config, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora)
        result = trainer.train()
    print(json.dumps({
        "trl": trl.__version__,
        "real_tokens_per_s": trainer.state.num_input_tokens_seen / result.metrics["train_runtime"],
        "train_runtime_s": result.metrics["train_runtime"],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "train_loss": result.training_loss,
        "settings": {k: getattr(config, k) for k in ("loss_type", "padding_free", "packing", "bf16",
                                                      "gradient_checkpointing", "assistant_only_loss")},
    }))


if __name__ == "__main__":
    main()
