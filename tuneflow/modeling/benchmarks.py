"""Benchmarks scored by lm-evaluation-harness on a model that is already loaded: the base, then the same base with the
adapter attached (no second load, no merge), through the harness's HF model wrapper, batched.

A harness task (mmlu, arc_easy, ...) is scored as the harness defines it. A team's own multiple-choice set is
defined for the harness through its own task-config mechanism: a task YAML in MMLU's prompt format
(`question`, the lettered choices, "Answer:"; accuracy over the choices' letters), found by `TaskManager`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneflow.core.errors import TuneflowError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the choices' labels in the prompt
SEED = 1234  # the harness's default seeds: the few-shot examples drawn
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class Benchmark:
    key: str  # its metrics: bench.<key>.acc, ...
    task: str  # the harness task or group (for a team's set: the generated task)
    num_fewshot: int = 0
    limit: int | None = None


def team_task(key: str, questions: Path) -> dict:
    """The harness task of a team's multiple-choice set, its rows in ``questions``
    (written by tuneflow.data.multiple_choice)."""
    return {
        "task": f"tuneflow_{key}".replace("-", "_"),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(questions)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\n{% for choice in choices %}" + "{{ '" + LETTERS + "'[loop.index0] }}. "
                       "{{ choice }}\n{% endfor %}Answer:",
        "doc_to_choice": "{{ '" + LETTERS + "'[:choices|length] | list }}",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
        "metadata": {"version": 1.0},
    }


def write_team_task(key: str, questions: Path, folder: Path) -> str:
    """Write the task YAML into ``folder`` (the harness's include path); return the task's name."""
    task = team_task(key, questions)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return task["task"]


def task_manager(task_dir: Path | None = None):
    """The harness's index of its tasks (and of the task YAMLs in ``task_dir``): built once per folder content, since
    indexing the harness's thousands of task files takes seconds."""
    files = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in Path(task_dir).glob("*.yaml"))) if task_dir else ()
    return _task_manager(str(task_dir) if task_dir else None, files)


@functools.lru_cache(maxsize=8)
def _task_manager(task_dir: str | None, files: tuple):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_dir) if task_dir else TaskManager()


class PromptTooLong(TuneflowError):
    pass


class BenchmarkUnavailable(TuneflowError):
    pass


def longest_prompt(b: Benchmark, manager, tokenizer, seed: int = SEED) -> int:
    """Tokens in the longest request of ``b`` as the harness builds it: the few-shot examples, the question and an
    answer choice."""
    import contextlib
    import io

    longest = 0
    with contextlib.redirect_stderr(io.StringIO()):  # the harness's and datasets' progress bars: the pre-flight's
        try:  # output is its problems
            tasks = list(manager.load([b.task])["tasks"].values())
        except Exception as exc:  # the task's data, fetched from the Hub (HF_ENDPOINT) by datasets
            raise BenchmarkUnavailable(f"eval.benchmarks {b.key}: its data cannot be loaded ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        for task in tasks:
            if task.get_config("num_fewshot") != 0:  # the harness keeps a task's explicit 0, as simple_evaluate does
                task.set_config(key="num_fewshot", value=b.num_fewshot)
            task.set_fewshot_seed(seed=seed)
            task.build_all_requests(limit=b.limit)
    for task in tasks:
        texts = ["".join(i.args) for i in task.instances]
        if texts:
            ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            longest = max(longest, max(len(i) for i in ids))
    return longest


def check_prompts(b: Benchmark, manager, tokenizer, context: int) -> None:
    """Refuse a benchmark whose longest prompt the model cannot read whole (the harness would cut it silently)."""
    longest = longest_prompt(b, manager, tokenizer)
    if longest > context:
        raise PromptTooLong(f"eval.benchmarks {b.key}: its longest {b.num_fewshot}-shot prompt is {longest} tokens, "
                            f"longer than the model's context of {context}; lower num_fewshot")


def score(model, tokenizer, benchmarks: list[Benchmark], task_dir: Path | None, batch_size: int,
          seed: int = SEED) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """bench.<key>.acc, .acc_norm and their stderr for each benchmark (a group's, e.g. MMLU's, over its subtasks as
    the harness aggregates them); and per benchmark the per-question log (question, target, acc)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(task_dir)
    metrics: dict[str, float] = {}
    samples: dict[str, list[dict]] = {}
    for b in benchmarks:
        check_prompts(b, manager, tokenizer, lm.max_length)
        out = simple_evaluate(model=lm, tasks=[b.task], num_fewshot=b.num_fewshot, limit=b.limit,
                              task_manager=manager, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
        result = out["results"][b.task]
        for metric in METRICS:
            for suffix in ("", "_stderr"):
                value = result.get(f"{metric}{suffix},none")
                if isinstance(value, (int, float)):
                    metrics[f"bench.{b.key}.{metric}{suffix}"] = float(value)
        samples[b.key] = [
            {"task": task, "question": str(s["doc"].get("question", s["doc"]))[:2000], "target": str(s["target"]),
             **{m: float(s[m]) for m in METRICS if m in s}}
            for task, logged in sorted(out["samples"].items()) for s in logged]
    return metrics, samples
