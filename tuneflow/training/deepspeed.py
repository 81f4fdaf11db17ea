"""DeepSpeed configs from the `train.deepspeed` preset names, built with accelerate's DeepSpeedPlugin.

Batch size, accumulation, clipping and precision stay "auto": the HF Trainer fills them from the same config
tree, so there is one place that sets each value.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneflow.core.config import DEEPSPEED_PRESETS


def deepspeed_config(preset: str) -> dict | None:
    """The DeepSpeed config dict for a preset name or a JSON path; None for 'none'."""
    if preset.endswith(".json"):
        return json.loads(Path(preset).read_text())
    if DEEPSPEED_PRESETS[preset] is None:
        return None
    from accelerate.utils import DeepSpeedPlugin

    stage, offload = DEEPSPEED_PRESETS[preset]
    plugin = DeepSpeedPlugin(
        zero_stage=stage,
        offload_optimizer_device="cpu" if offload else "none",
        offload_param_device="cpu" if offload else "none",
        # Gather sharded weights into one 16-bit copy on save (full and freeze under ZeRO-3; the Trainer gathers
        # a PEFT adapter itself).
        zero3_save_16bit_model=True,
    )
    config = dict(plugin.deepspeed_config)
    config["steps_per_print"] = 10**9  # the plugin's float('inf') is not valid JSON; progress comes from the Trainer
    config["bf16"] = {"enabled": "auto"}
    config["fp16"] = {"enabled": "auto"}
    return config
