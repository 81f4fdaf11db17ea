"""Benchmarks scored by lm-evaluation-harness on a model that is already loaded: the base, then the same base with the
adapter attached (no second load, no merge), through the harness's HF model wrapper, batched.

A harness task (mmlu, arc_easy, ...) is scored as the harness defines it. A team's own multiple-choice set is
defined for the harness through its own task-config mechanism: a task YAML in MMLU's prompt format
(`question`, the lettered choices, "Answer:"; accuracy over the choices' letters), found by `TaskManager`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the choices' labels in the prompt
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


def score(model, tokenizer, benchmarks: list[Benchmark], task_dir: Path | None, batch_size: int,
          seed: int = 1234) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """bench.<key>.acc, .acc_norm and their stderr for each benchmark (a group's, e.g. MMLU's, over its subtasks as
    the harness aggregates them); and per benchmark the per-question log (question, target, acc)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = TaskManager(include_path=str(task_dir)) if task_dir else TaskManager()
    metrics: dict[str, float] = {}
    samples: dict[str, list[dict]] = {}
    for b in benchmarks:
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
