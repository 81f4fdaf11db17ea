"""The benchmarks of `eval.benchmarks`, ready to score: a harness task checked against the harness's own task list; a
team's multiple-choice set located (a Hub dataset pinned to its commit, through HF_ENDPOINT and the Hub cache, or a
local path at a content digest), read and checked row by row, and written out with its task YAML."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

from tuneflow.core.config import BenchmarkConfig, TuneflowConfig
from tuneflow.core.results import SourceRef
from tuneflow.data.formats import DATA_SUFFIXES, DatasetError
from tuneflow.data.multiple_choice import load_questions, write_questions
from tuneflow.modeling.benchmarks import Benchmark, write_team_task
from tuneflow.sources.hub import DATASET_PATTERNS, Problem, hub_token, locate, pinned, snapshot


@dataclass
class Prepared:
    benchmarks: list[Benchmark]
    task_dir: Path | None  # the generated task YAMLs (the harness's include path)
    sources: dict[str, SourceRef]  # a team set's key -> where its rows come from, pinned


def harness_tasks() -> list[str]:
    from lm_eval.tasks import TaskManager

    return TaskManager().all_tasks


def unknown_task(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"eval.benchmarks: {name!r} is not a task or group of lm-evaluation-harness{hint}"


def team_rows(bench: BenchmarkConfig, cfg: TuneflowConfig, logger: logging.Logger) -> tuple[list[dict], SourceRef]:
    """A team set's checked rows and its pinned source."""
    path = Path(bench.dataset).expanduser()
    if not path.exists() and (bench.dataset.startswith(("/", ".", "~")) or bench.dataset.endswith(DATA_SUFFIXES)):
        raise Problem(f"dataset: no such file or folder: {bench.dataset}")
    src = locate(bench.dataset, bench.revision, "dataset", logger, hub_token(cfg))
    folder = snapshot(src, DATASET_PATTERNS, logger)
    return load_questions(folder, bench.split), pinned(src, folder)


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


def benchmark_problems(cfg: TuneflowConfig, logger: logging.Logger) -> list[str]:
    """Pre-flight: an unknown task (with close names), a set that is missing, unreachable or has bad rows."""
    problems, known = [], None
    for bench in cfg.eval.benchmarks:
        try:
            if bench.task:
                known = known if known is not None else harness_tasks()
                if bench.task not in known:
                    problems.append(unknown_task(bench.task, known))
            else:
                team_rows(bench, cfg, logger)
        except (Problem, DatasetError) as exc:
            problems.append(f"eval.benchmarks {bench.key}: {exc}")
    return problems
