"""An adapter to start training from (train.preference.init_adapter): found on this machine, and checked to fit the
base model before anything trains.

    adapter_folder("runs:/<run id>/adapter", dst, tracking_uri)   # an MLflow artifact, downloaded into dst
    fit_problems(folder, model_config, key)                       # [] when every LoRA matrix fits the model
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

LORA_TENSOR = re.compile(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])\.weight$")


def adapter_folder(where: str, dst: Path, tracking_uri: str | None) -> Path:
    """A PEFT adapter's folder on this machine: a local folder as it is, or an MLflow artifact (``runs:/RUN/adapter``)
    downloaded into ``dst`` (once)."""
    if not where.startswith("runs:/"):
        return Path(where)
    from mlflow.artifacts import download_artifacts

    if not (dst / "adapter_config.json").is_file():
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        got = Path(download_artifacts(artifact_uri=where, dst_path=str(dst), tracking_uri=tracking_uri))
        if got != dst:
            for item in got.iterdir():
                item.rename(dst / item.name)
            got.rmdir()
    return dst


def fit_problems(folder: Path, model_config: dict, key: str) -> list[str]:
    """Whether the adapter in ``folder`` was trained on a model of this shape: each LoRA matrix's size against the
    layer it adapts (``key``: the config key that names the adapter, for the message)."""
    from safetensors import safe_open

    from tuneflow.memory.shape import ModelShape, PlanError

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return [f"{key}: {folder} holds no adapter_model.safetensors; name the folder (or runs:/RUN_ID/adapter) of a "
                "trained adapter"]
    try:
        shape = ModelShape.from_config(model_config)
    except PlanError:
        return []  # a shape the plan does not know: loading the adapter will say whether it fits
    linears = shape.linears()
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            match = LORA_TENSOR.search(name)
            if not match or match.group(2) not in linears:
                continue
            layer, module, side = int(match.group(1)), match.group(2), match.group(3)
            size = f.get_slice(name).get_shape()
            fan_in, fan_out = linears[module]
            got, want = (size[1], fan_in) if side == "A" else (size[0], fan_out)
            verb = "takes" if side == "A" else "gives"
            if layer >= shape.layers:
                return [f"{key}: {folder} was trained on another model: it adapts layer {layer}, and this model has "
                        f"{shape.layers} layers"]
            if got != want:
                return [f"{key}: {folder} was trained on another model: its layer {layer} {module} adapter {verb} "
                        f"{got} features, this model's {module} {verb} {want}"]
    return []
