"""train.optimizer: each optimizer's state counted by the memory plan, paged ones refused where there is no CUDA,
optimizers DeepSpeed's CPU offload cannot step refused in the config."""

import pytest

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.loading import ConfigError, load_config
from tuneflow.memory.estimate import plan
from tuneflow.memory.render import render
from tuneflow.modeling.precision import Machine, optimizer_problem

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def config(**train) -> TuneflowConfig:
    return TuneflowConfig.model_validate({"dataset": {"name_or_path": "x"}, "train": {"nproc_per_node": 1, **train}})


@pytest.mark.parametrize("optimizer, per_param", [
    ("adamw_torch_fused", 8), ("adamw_torch", 8),  # LoRA adapters train in fp32 without DeepSpeed: 2 x 4 bytes
    ("adamw_8bit", 2.03), ("paged_adamw_8bit", 2.03), ("paged_adamw_32bit", 8),
    ("lion_8bit", 1.02), ("lion_32bit", 4), ("adafactor", 0), ("sgd", 0),
])
def test_the_plan_counts_each_optimizers_state(optimizer, per_param):
    p = plan(config(optimizer=optimizer, deepspeed="none"), LLAMA_7B, world_size=1)
    trainable = p.params["trainable"]
    assert p.per_rank["optimizer"] == pytest.approx(trainable * per_param, abs=1)


def test_under_deepspeed_the_optimizer_steps_fp32_copies():
    adamw = plan(config(deepspeed="zero2", precision="bf16"), LLAMA_7B, world_size=1)
    eight = plan(config(deepspeed="zero2", precision="bf16", optimizer="adamw_8bit"), LLAMA_7B, world_size=1)
    trainable = adamw.params["trainable"]
    assert adamw.per_rank["optimizer"] == trainable * (8 + 4)  # fp32 moments + fp32 master of 16-bit adapters
    assert eight.per_rank["optimizer"] == pytest.approx(trainable * (2.03 + 4), abs=1)
    table = render(eight, "llama-7b")
    assert "optimizer states (AdamW, 2 moments of 8 bits + fp32 master)" in table, table
    assert "(AdamW, 2 moments in fp32 + fp32 master)" in render(adamw, "llama-7b")


def test_paged_optimizers_need_cuda():
    cpu = Machine(gpu=None, cpu="AVX2")
    said = optimizer_problem(config(optimizer="paged_adamw_8bit"), cpu)
    assert said == ("train.optimizer: paged_adamw_8bit pages its states through CUDA memory, and CPU AVX2 (no native "
                    "bf16) has no CUDA GPU; use adamw_8bit here (the same states, unpaged)")
    assert optimizer_problem(config(optimizer="paged_adamw_8bit"), Machine(gpu="NVIDIA H100", gpu_bf16=True)) is None
    assert optimizer_problem(config(optimizer="adamw_8bit"), cpu) is None


def test_cpu_offload_takes_adamw_only():
    with pytest.raises(ConfigError, match="train.optimizer: lion_8bit cannot step states offloaded to the CPU by "
                                          "zero3_offload"):
        load_config(data={"dataset": {"name_or_path": "x"},
                          "train": {"method": "lora", "deepspeed": "zero3_offload", "optimizer": "lion_8bit"}})
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(data={"dataset": {"name_or_path": "x"}, "train": {"optimizer": "adam"}})
