"""A model's config.json alone, before any weights: from its local folder, or that one small file from the Hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tuneflow.core.config import TuneflowConfig, tracking_uri
from tuneflow.memory.shape import PlanError
from tuneflow.sources.registered import is_registered


def read_model_config(cfg: TuneflowConfig) -> dict:
    """The model's config.json: from the local folder, that one file from the Hub (revision model.revision), or a
    model logged to MLflow (models:/…)."""
    name = cfg.model.name_or_path
    local = Path(name).expanduser()
    if local.exists():
        path = local / "config.json" if local.is_dir() else local
        if not path.is_file():
            raise PlanError(f"model.name_or_path: {name} has no config.json; it is not a transformers model")
    elif is_registered(name):  # a model logged to MLflow: the whole model is one download, kept in the cache
        from tuneflow.sources.registered import RegisteredModelProblem, registered_folder

        try:
            path = registered_folder(name, tracking_uri(cfg.tracking.uri)) / "config.json"
        except RegisteredModelProblem as exc:
            raise PlanError(str(exc)) from None
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
