"""Pre-flight: everything that can be checked before model weights are downloaded or training starts.

    tuneflow validate --config configs/my.yaml     # the config, then these checks, without Prefect

The download stage runs the same checks first. From the Hub it fetches only the repo listing, the small files
(config, tokenizer, chat template) and the dataset; the weights come afterwards, once nothing stands in the way.
Every problem found is reported at once, each naming the key, file or row to change.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tuneflow.config import TuneflowConfig
from tuneflow.data.formats import DATA_SUFFIXES

# What loading a model needs: configs, tokenizer files, chat templates; weights (safetensors only) come last.
MODEL_SMALL_FILES = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt", "tokenizer*"]
WEIGHTS = ["*.safetensors"]
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DATASET_PATTERNS = [f"{prefix}*{suffix}" for prefix in ("", "**/") for suffix in DATA_SUFFIXES]
RETRY_DELAYS = (2, 5, 15, 30)


class Problem(Exception):
    """One thing that stops the run, worded for the user."""


class RepoNotFound(Problem):
    pass


class PreflightError(RuntimeError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(f"{count} found before downloading weights or training:\n{lines}")


@dataclass
class Source:
    """A model or dataset: a local path, or a Hub repo at a resolved commit with its file listing."""

    key: str  # "model" or "dataset": the config section
    name: str
    revision: str
    local: Path | None = None
    sha: str | None = None  # None when offline: the cache decides
    files: list[str] = field(default_factory=list)
    token: str | None = field(default=None, repr=False)  # None: huggingface_hub's own (HF_TOKEN, hf auth login)

    @property
    def repo_type(self) -> str:
        return self.key


def model_patterns(cfg: TuneflowConfig) -> list[str]:
    # Python files only when the config trusts the repo's code (and then pins its revision).
    return MODEL_SMALL_FILES + WEIGHTS + (["*.py"] if cfg.model.trust_remote_code else [])


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def hub_call(fn, src: Source, logger: logging.Logger):
    """Call the Hub with retries and backoff on network errors; turn the Hub's refusals into Problems."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{src.key} {src.name}"
    delays = () if offline() else RETRY_DELAYS
    for attempt, delay in enumerate((*delays, None), 1):
        try:
            return fn()
        except GatedRepoError:
            raise Problem(f"{src.key}.name_or_path: {src.name} is gated; accept its terms on the Hub, then set "
                          "HF_TOKEN (or hub.token_secret) to a token of that account") from None
        except RevisionNotFoundError:
            raise Problem(f"{src.key}.revision: {src.revision!r} is not a branch, tag or commit of {src.name}") from None
        except RepositoryNotFoundError:
            raise RepoNotFound(f"{src.key}.name_or_path: {src.name} is neither a local path nor a repo on the Hub "
                          f"({src.repo_type}s); check the name, or set HF_TOKEN if it is private") from None
        except LocalEntryNotFoundError as exc:
            if offline():
                raise Problem(f"{what}: HF_HUB_OFFLINE is set and the cache has no complete snapshot of revision "
                              f"{src.revision!r}: {str(exc).splitlines()[0]}") from None
            error = exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 500
            if status < 500 and status != 429:
                raise Problem(f"{what}: the Hub refused the request: {str(exc).splitlines()[0]}") from None
            error = exc  # overloaded or failing: retry
        except (httpx2.TransportError, OSError) as exc:  # connection refused or reset, a timeout
            error = exc
        if delay is None:
            raise Problem(f"{what}: the Hub did not answer after {attempt} attempts: {error}")
        logger.warning("%s: Hub request failed (%s); retry %d in %ss", what, str(error).splitlines()[0], attempt, delay)
        time.sleep(delay)


def unsafe_names(files: list[str]) -> list[str]:
    """Repo file names that would land outside the snapshot folder: absolute, '..' or backslash paths."""
    return [f for f in files if f.startswith("/") or "\\" in f or ".." in PurePosixPath(f).parts]


def has_main(api, name: str, repo_type: str) -> bool:
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        api.repo_info(name, repo_type=repo_type, revision="main")
    except RepositoryNotFoundError:
        return False
    return True


def locate(name_or_path: str, revision: str, key: str, logger: logging.Logger, token: str | None = None) -> Source:
    """A local path as it is; a Hub repo resolved to a commit SHA with its file listing (nothing downloaded)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return Source(key, name_or_path, revision, local=local.resolve())
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.endswith(DATA_SUFFIXES):
        raise Problem(f"{key}.name_or_path: no such file or folder: {name_or_path}")
    src = Source(key, name_or_path, revision, token=token)
    if offline():
        return src
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        info = hub_call(lambda: api.repo_info(name_or_path, repo_type=key, revision=revision), src, logger)
    except RepoNotFound:
        # Some Hub servers (mirrors) answer an unknown revision as an unknown repo: tell the two apart.
        if revision != "main" and has_main(api, name_or_path, key):
            raise Problem(f"{key}.revision: {revision!r} is not a branch, tag or commit of {name_or_path}") from None
        raise
    src.sha, src.files = info.sha, sorted(s.rfilename for s in info.siblings or [])
    unsafe = unsafe_names(src.files)
    if unsafe:
        raise Problem(f"{key}.name_or_path: {name_or_path} lists file names that leave the repo folder: {unsafe[:3]}")
    return src


def snapshot(src: Source, patterns: list[str], logger: logging.Logger) -> Path:
    """The files matching ``patterns`` from the Hub cache, downloading what it lacks (atomically, per file)."""
    if src.local is not None:
        return src.local
    from huggingface_hub import snapshot_download

    folder = Path(hub_call(lambda: snapshot_download(src.name, repo_type=src.repo_type, revision=src.revision,
                                                     allow_patterns=patterns, token=src.token), src, logger))
    if src.sha and folder.name != src.sha:
        raise Problem(f"{src.key} {src.name}: revision {src.revision!r} moved from {src.sha} to {folder.name} "
                      f"during the download; run again, or pin {src.key}.revision to a commit")
    return folder


def cached_fraction(src: Source, patterns: list[str]) -> tuple[int, int]:
    """(files already in the Hub cache, files wanted) for the Hub files matching ``patterns``."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    wanted = list(filter_repo_objects(src.files, allow_patterns=patterns))
    cached = sum(isinstance(try_to_load_from_cache(src.name, f, revision=src.sha, repo_type=src.repo_type), str)
                 for f in wanted)
    return cached, len(wanted)


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


def dataset_problems(path: Path, cfg: TuneflowConfig) -> list[str]:
    """Every row parsed and validated for dataset.format, and the eval split checked against the row count."""
    from tuneflow.data.formats import DatasetError, load_dataset_rows, split_indices

    try:
        rows, _ = load_dataset_rows(path, cfg)
        split_indices(len(rows), cfg.dataset.eval_size, cfg.train.seed)
    except DatasetError as exc:
        return [str(exc)]
    return []


def hardware_problems(cfg: TuneflowConfig) -> list[str]:
    import torch

    if cfg.train.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return [f"train.precision: bf16 is not supported by {torch.cuda.get_device_name()}; use fp16"]
    return []


@dataclass
class Checked:
    model: Source
    model_dir: Path  # the small files (a Hub snapshot without weights yet), or the local folder
    dataset: Source
    dataset_dir: Path


def hub_token(cfg: TuneflowConfig) -> str | None:
    """The token from the Prefect Secret block named by hub.token_secret; None leaves it to huggingface_hub."""
    if not cfg.hub.token_secret:
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(cfg.hub.token_secret).get()
    except ValueError:
        raise Problem(f"hub.token_secret: there is no Prefect Secret block named {cfg.hub.token_secret!r}; create "
                      "it in the Prefect UI (Blocks > Secret) or with Secret(value=...).save(name)") from None


def preflight(cfg: TuneflowConfig, logger: logging.Logger) -> Checked:
    """Run every check; raise PreflightError listing all problems found."""
    problems: list[str] = hardware_problems(cfg)
    model = model_dir = dataset = dataset_dir = None
    try:
        token = hub_token(cfg)
    except Problem as exc:
        raise PreflightError(problems + [str(exc)]) from None
    try:
        model = locate(cfg.model.name_or_path, cfg.model.revision, "model", logger, token)
        if model.sha:
            problems += weights_problems(model, model.files)
        small = [p for p in model_patterns(cfg) if p not in WEIGHTS]
        model_dir = snapshot(model, small, logger)
        if model.local is not None:
            problems += weights_problems(model, [p.name for p in model_dir.iterdir()])
        problems += model_folder_problems(model_dir, cfg)
    except Problem as exc:
        problems.append(str(exc))
    try:
        dataset = locate(cfg.dataset.name_or_path, cfg.dataset.revision, "dataset", logger, token)
        dataset_dir = snapshot(dataset, DATASET_PATTERNS, logger)
        problems += dataset_problems(dataset_dir, cfg)
    except Problem as exc:
        problems.append(str(exc))
    if problems:
        raise PreflightError(problems)
    return Checked(model, model_dir, dataset, dataset_dir)
