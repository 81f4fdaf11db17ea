"""The benchmarks of `eval.benchmarks`, ready to score: a harness task checked against the harness's own task list; a
team's multiple-choice set located (a Hub dataset pinned to its commit, through HF_ENDPOINT and the Hub cache, or a
local path at a content digest), read and checked row by row, and written out with its task YAML."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.evaluation import BenchmarkConfig
from tuneflow.core.results import SourceRef
from tuneflow.data.formats import DatasetError
from tuneflow.data.multiple_choice import load_questions, write_questions
from tuneflow.modeling.benchmarks import Benchmark, write_team_task
from tuneflow.sources.hub import DATASET_PATTERNS, Problem, hub_token, locate, pinned, rekey, snapshot


@dataclass
class Prepared:
    benchmarks: list[Benchmark]
    task_dir: Path | None  # the generated task YAMLs (the harness's include path)
    sources: dict[str, SourceRef]  # a team set's key -> where its rows come from, pinned


def harness_tasks() -> list[str]:
    from tuneflow.modeling.benchmarks import task_manager

    return task_manager().all_tasks


def unknown_task(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"eval.benchmarks: {name!r} is not a task or group of lm-evaluation-harness{hint}"


def team_rows(bench: BenchmarkConfig, cfg: TuneflowConfig, logger: logging.Logger) -> tuple[list[dict], SourceRef]:
    """A team set's checked rows and its pinned source."""
    try:
        src = locate(bench.dataset, bench.revision, "dataset", logger, hub_token(cfg))
        folder = snapshot(src, DATASET_PATTERNS, logger)
    except Problem as exc:  # worded for dataset.*: said of this benchmark's keys
        key = f"eval.benchmarks {bench.key}"
        raise Problem(rekey(exc, "dataset", f"{key}: dataset", f"{key}: revision")) from None
    try:
        return load_questions(folder, bench.split), pinned(src, folder)
    except DatasetError as exc:
        raise DatasetError(f"eval.benchmarks {bench.key}: {exc}") from None


def prepare(cfg: TuneflowConfig, folder: Path, logger: logging.Logger) -> Prepared:
    """Every benchmark of ``cfg.eval.benchmarks`` as the harness scores it; team sets written under ``folder``."""
    prepared = Prepared([], None, {})
    known = None
    for bench in cfg.eval.benchmarks:
        if bench.task:
            known = known if known is not None else harness_tasks()
            if bench.task not in known:
                raise Problem(unknown_task(bench.task, known))
            prepared.benchmarks.append(Benchmark(bench.key, bench.task, bench.num_fewshot, bench.limit))
            continue
        rows, ref = team_rows(bench, cfg, logger)
        prepared.task_dir = folder / "tasks"
        questions = write_questions(rows, folder / "data" / f"{bench.key}.jsonl")
        task = write_team_task(bench.key, questions, prepared.task_dir)
        prepared.benchmarks.append(Benchmark(bench.key, task, bench.num_fewshot, bench.limit))
        prepared.sources[bench.key] = ref
        logger.info("benchmark %s: %d questions from %s@%s", bench.key, len(rows), ref.name, ref.revision[:12])
    return prepared


def benchmark_problems(cfg: TuneflowConfig, logger: logging.Logger, model_dir: Path | None = None) -> list[str]:
    """Pre-flight: an unknown task (with close names); a team set that is missing, unreachable or has bad rows, or
    whose few-shot prompts the model in ``model_dir`` cannot read whole. (A harness task's prompts are measured by
    evaluate, which fetches its data, before scoring.)"""
    import tempfile

    from tuneflow.modeling.benchmarks import PromptTooLong, check_prompts, task_manager

    problems, team = [], []
    with tempfile.TemporaryDirectory(prefix="tuneflow-bench-") as folder:
        for bench in cfg.eval.benchmarks:
            try:
                if not bench.task:
                    team += prepare(only(cfg, [bench]), Path(folder), logger).benchmarks
            except (Problem, DatasetError) as exc:
                problems.append(str(exc))
        tasks = [b.task for b in cfg.eval.benchmarks if b.task]
        if not tasks and not (team and model_dir):
            return problems
        manager = task_manager(Path(folder) / "tasks" if team else None)
        problems += [unknown_task(t, manager.all_tasks) for t in tasks if t not in manager.all_tasks]
        if team and model_dir is not None:
            tokenizer, context = context_length(cfg, model_dir)
            for b in team:
                try:
                    check_prompts(b, manager, tokenizer, context)
                except PromptTooLong as exc:
                    problems.append(str(exc))
    return problems


def only(cfg: TuneflowConfig, benchmarks: list[BenchmarkConfig]) -> TuneflowConfig:
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"benchmarks": benchmarks})})


def context_length(cfg: TuneflowConfig, model_dir: Path):
    """(the model's tokenizer, the longest input it reads in tokens, as the harness resolves it)."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    code = cfg.model.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=code)
    return tokenizer, resolve_max_length(AutoConfig.from_pretrained(model_dir, trust_remote_code=code), tokenizer)
