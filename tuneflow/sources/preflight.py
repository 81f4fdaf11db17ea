"""Pre-flight: everything that can be checked before model weights are downloaded or training starts.

    tuneflow validate --config configs/my.yaml     # the config, then these checks, without Prefect

The download stage runs the same checks first. From the Hub it fetches only the repo listing, the small files
(config, tokenizer, chat template) and the dataset; the weights come afterwards, once nothing stands in the way.
Every problem found is reported at once, each naming the key, file or row to change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.config import tracking_uri as core_tracking_uri
from tuneflow.core.errors import TuneflowError
from tuneflow.sources.hub import (
    DATASET_PATTERNS,
    WEIGHTS,
    Problem,
    Source,
    hub_token,
    locate,
    model_patterns,
    rekey,
    snapshot,
)

# What loading a model needs: configs, tokenizer files, chat templates; weights (safetensors only) come last.
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PreflightError(TuneflowError, RuntimeError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"{count} found before downloading weights or training:\n{lines}")


def weights_problems(src: Source, names: list[str]) -> list[str]:
    if any(n.endswith(".safetensors") for n in names):
        return []
    pickles = [n for n in names if n.endswith(PICKLE_WEIGHTS)]
    if pickles:
        return [f"model.name_or_path: {src.name} has only pickle weights ({', '.join(pickles[:3])}); tuneflow loads "
                "safetensors only, since unpickling can run code: convert them, or pick a repo with .safetensors"]
    return [f"model.name_or_path: {src.name} has no weights (no .safetensors files)"]


def model_folder_problems(folder: Path, cfg: TuneflowConfig) -> list[str]:
    """Checks on the model's small files: supported architecture, custom code, chat template."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name, problems = cfg.model.name_or_path, []
    config_file = folder / "config.json"
    if not config_file.is_file():
        return [f"model.name_or_path: {name} has no config.json; it is not a transformers model"]
    try:
        config = json.loads(config_file.read_text())
        tokenizer_config = folder / "tokenizer_config.json"
        tok = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"model.name_or_path: {name} has a config file that is not valid JSON ({exc})"]
    custom = config.get("auto_map") or tok.get("auto_map")
    if custom and not cfg.model.trust_remote_code:
        problems.append(f"model.trust_remote_code: {name} needs Python code from its repo ({sorted(custom)[0]} in "
                        "auto_map); set model.trust_remote_code: true and pin model.revision to a commit SHA, "
                        "or use a model that transformers supports natively")
    elif not custom and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        problems.append(f"model.name_or_path: {name} has model_type {config.get('model_type')!r}, which this "
                        "transformers does not know")
    has_template = tok.get("chat_template") or any(
        (folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json"))
    if not (has_template or cfg.model.chat_template):
        problems.append(f"model.chat_template: {name} has no chat template, and every dataset format is rendered "
                        "as a chat; set model.chat_template to a Jinja template (or use an instruct model)")
    return problems


def dataset_problems(path: Path, cfg: TuneflowConfig, key: str, source) -> list[str]:
    """Every row of ``source`` (configured under ``key``) parsed and validated for its format, and for a training
    dataset without eval_dataset, its held-out split checked against the row count."""
    from tuneflow.data.formats import DatasetError, load_dataset_rows, split_indices

    try:
        rows, _ = load_dataset_rows(path, cfg, source, key)
        if key != "eval_dataset" and cfg.eval_dataset is None:
            split_indices(len(rows), source.eval_size, cfg.train.seed, key)
    except DatasetError as exc:
        return [str(exc)]
    return []


def memory_problems(model_dir: Path, cfg: TuneflowConfig) -> list[str]:
    """The memory plan against train.gpu_memory (or the local GPU): a config that cannot fit is refused here,
    before any weights are downloaded or a GPU is booked."""
    from tuneflow.core.config import parse_size
    from tuneflow.memory.auto import plan_problems
    from tuneflow.memory.estimate import visible_gpu_memory

    gpu = parse_size(cfg.train.gpu_memory) if cfg.train.gpu_memory else visible_gpu_memory()
    config_file = model_dir / "config.json"
    if gpu is None or not config_file.is_file():
        return []
    return plan_problems(cfg, json.loads(config_file.read_text()), gpu)


def init_adapter_problems(cfg: TuneflowConfig, model_dir: Path | None, tracking_uri: str | None) -> list[str]:
    """train.preference.init_adapter is there (a local folder, or an MLflow artifact) and fits the base model."""
    import tempfile

    from tuneflow.sources.adapters import adapter_folder, fit_problems

    where, key = cfg.train.preference.init_adapter, "train.preference.init_adapter"
    if cfg.train.objective == "sft" or not where or model_dir is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = adapter_folder(where, Path(tmp) / "adapter", tracking_uri)
        except Exception as exc:  # MLflow says what is missing: the run, or the artifact in it
            return [f"{key}: {where} cannot be fetched ({str(exc).splitlines()[0][:200]})"]
        if not folder.is_dir():
            return [f"{key}: no such folder: {folder}"]
        return fit_problems(folder, json.loads((model_dir / "config.json").read_text()), key)


def hardware_problems(cfg: TuneflowConfig) -> list[str]:
    import torch

    if cfg.train.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return [f"train.precision: bf16 is not supported by {torch.cuda.get_device_name()}; use fp16"]
    return []


@dataclass
class Checked:
    model: Source
    model_dir: Path  # the small files (a Hub snapshot without weights yet), or the local folder
    datasets: list[Source]  # one per cfg.all_sources: the training datasets, then eval_dataset when set
    dataset_dirs: list[Path]


def preflight(cfg: TuneflowConfig, logger: logging.Logger, tracking_uri: str | None = None) -> Checked:
    """Run every check; raise PreflightError listing all problems found (``tracking_uri``: the MLflow server a model
    logged there, models:/..., or an adapter to start from, runs:/..., is fetched from)."""
    problems: list[str] = hardware_problems(cfg)
    model = model_dir = None
    try:
        token = hub_token(cfg)
    except Problem as exc:
        raise PreflightError(problems + [str(exc)]) from None
    try:
        model = locate(cfg.model.name_or_path, cfg.model.revision, "model", logger, token,
                       tracking_uri or core_tracking_uri(cfg.tracking.uri))
        if model.sha and not model.registry:
            problems += weights_problems(model, model.files)
        small = [p for p in model_patterns(cfg) if p not in WEIGHTS]
        model_dir = snapshot(model, small, logger)
        if model.local is not None or model.registry:
            problems += weights_problems(model, [p.name for p in model_dir.iterdir()])
        problems += model_folder_problems(model_dir, cfg)
        problems += memory_problems(model_dir, cfg)
        problems += init_adapter_problems(cfg, model_dir, tracking_uri)
    except Problem as exc:
        problems.append(str(exc))
    datasets, dataset_dirs = [], []
    for key, source in cfg.all_sources:
        try:
            found = locate(source.name_or_path, source.revision, "dataset", logger, token)
            folder = snapshot(found, DATASET_PATTERNS, logger)
            problems += dataset_problems(folder, cfg, key, source)
            datasets.append(found)
            dataset_dirs.append(folder)
        except Problem as exc:
            problems.append(str(exc) if key == "dataset" else rekey(exc, "dataset", f"{key}.name_or_path",
                                                                     f"{key}.revision"))
    if cfg.eval.benchmarks:
        from tuneflow.sources.benchmarks import benchmark_problems

        problems += benchmark_problems(cfg, logger, model_dir)
    if cfg.eval.judge:
        from tuneflow.sources.judge import judge_problems

        problems += judge_problems(cfg, logger)
    if problems:
        raise PreflightError(problems)
    return Checked(model, model_dir, datasets, dataset_dirs)
