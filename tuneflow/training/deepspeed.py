"""DeepSpeed configs from the `train.deepspeed` preset names, built with accelerate's DeepSpeedPlugin.

Batch size, accumulation, clipping and precision stay "auto": the HF Trainer fills them from the same config
tree, so there is one place that sets each value.
"""

from __future__ import annotations

import json
from pathlib import Path

STAGES = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}


def deepspeed_config(preset: str) -> dict | None:
    """The DeepSpeed config dict for a preset name or a JSON path; None for 'none'."""
    if preset == "none":
        return None
    if preset.endswith(".json"):
        return json.loads(Path(preset).read_text())
    from accelerate.utils import DeepSpeedPlugin

    offload = "cpu" if preset == "zero3_offload" else "none"
    plugin = DeepSpeedPlugin(
        zero_stage=STAGES[preset],
        offload_optimizer_device=offload,
        offload_param_device=offload,
        # Gather sharded weights into one 16-bit copy on save (full and freeze under ZeRO-3; the Trainer gathers
        # a PEFT adapter itself).
        zero3_save_16bit_model=True,
    )
    config = dict(plugin.deepspeed_config)
    config["steps_per_print"] = 10**9  # the plugin's float('inf') is not valid JSON; progress comes from the Trainer
    config["bf16"] = {"enabled": "auto"}
    config["fp16"] = {"enabled": "auto"}
    return config
