"""A hyperparameter search over config keys (`tuneflow sweep`, the `sweep:` section): the space, how it is searched,
and its checks, made before the first trial starts.

    sweep:
      space:
        train.learning_rate: {low: 1.0e-5, high: 5.0e-4, log: true}
        train.lora.rank: [8, 16, 32]
        train.epochs: {low: 1, high: 3, step: 1}
      trials: 8
      sampler: tpe

Each key's values (its choices, every point of a stepped range, both ends of a range) are validated by the config tree
itself, so a bound outside a key's own bounds, an unknown key ("did you mean ...") or a choice the key does not accept
is refused with the key's own message.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from tuneflow.core.section import Section

# Keys that decide which rows trials are scored on (and how they are read), where results go, or the search itself:
# the same for every trial. Of a dataset, only its weight in the mix may vary.
FIXED_KEYS = ("eval.", "eval_dataset.", "dataset.", "model.", "prep.cutoff_len", "prep.on_invalid", "train.seed",
              "registry.", "sweep.", "tracking.", "output_dir", "run_name", "hub.", "export.")


class Range(Section):
    """Numbers between two bounds: floats, or integers when both bounds and step are integers."""

    low: Union[int, float] = Field(..., description="The smallest value (integers: both bounds written as such).")
    high: Union[int, float] = Field(..., description="The largest value.")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")
    step: Optional[Union[int, float]] = Field(None, gt=0, description="Only values low + k x step, up to high.")

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.high < self.low:
            raise ValueError(f"high {self.high:g} is below low {self.low:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together")
        return self

    @property
    def integer(self) -> bool:
        """Integers: low, high (and step) written as whole numbers (1, not 1.0)."""
        return all(isinstance(v, int) for v in (self.low, self.high, self.step if self.step is not None else 1))

    def ends(self) -> list[float | int]:
        return [self.low, self.high]

    def grid(self) -> list[float | int] | None:
        """Every value of a stepped range (low, low + step, ... up to high), None without a step."""
        if self.step is None:
            return None
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [self.low + k * self.step for k in range(n + 1)]


Dimension = Union[Range, list]


class SweepConfig(Section):
    """`tuneflow sweep`: trials of the pipeline over a space of config keys, searched by Optuna."""

    space: dict[str, Dimension] = Field(
        default_factory=dict, description="Dotted config key -> [choices] or {low, high, log, step}, e.g. "
        "{train.learning_rate: {low: 1e-5, high: 5e-4, log: true}, train.lora.rank: [8, 16, 32]}; "
        "`tuneflow sweep --space FILE` reads it from a YAML file.")
    trials: int = Field(8, ge=1, le=1000, description="Trials in the study (a resumed study counts those it has).")
    parallel: int = Field(
        1, ge=1, le=32, description="Trials at once (`tuneflow sweep --parallel P`): each its own pipeline; on a "
        "team's server their training runs queue on tuneflow-train/gpu's concurrency limit. TPE then assumes the "
        "running trials' values are bad (constant liar) so that it does not propose them twice.")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="Optuna's sampler: tpe (Bayesian), random, or grid (every combination of choices and "
        "stepped ranges, in seeded order).")
    seed: int = Field(0, description="Seed of the sampler: the same seed proposes the same trials.")
    metric: Optional[str] = Field(
        None, description="The held-out metric trials are ranked by (any metric evaluate logs: eval_loss, rouge-l, "
        "pref_accuracy, bench.NAME.acc, ...); unset: registry.metric.")
    greater_is_better: Optional[bool] = Field(
        None, description="Whether a greater metric is better; unset: known from the metric (false for losses).")
    pruner: Literal["none", "median", "hyperband"] = Field(
        "none", description="Stop a trial's training early when its held-out loss (every train.eval_steps) is worse "
        "than the median of earlier trials' at the same step (median: Optuna's MedianPruner after 2 trials), or by "
        "Hyperband's brackets (hyperband); none: every trial trains to the end.")
    storage: Optional[str] = Field(
        None, description="Optuna's study storage (a database URL, e.g. the stack's PostgreSQL); unset: "
        "sqlite optuna.db next to the MLflow sqlite store, else (a tracking server) in this machine's tuneflow cache "
        "(a sweep then resumes on the same machine; give the team's database to resume it on any).")
    study_name: Optional[str] = Field(None, description="The study's name in the storage; unset: run_name. "
                                      "A sweep with a study name that exists resumes it.")


def values_to_check(dimension: Dimension) -> list[Any]:
    """The values of a dimension that stand for all of it: its choices, every point of a stepped range, or the ends
    of a range."""
    if isinstance(dimension, list):
        return list(dimension)
    return dimension.grid() or dimension.ends()


def fixed_key_problem(key: str) -> str | None:
    mixed = key.startswith("datasets.") and not re.fullmatch(r"datasets\.\d+\.weight", key)
    if any(key == k.rstrip(".") or key.startswith(k) for k in FIXED_KEYS) or mixed:
        return (f"sweep.space: {key} is the same for every trial (it decides the rows trials are scored on, where "
                "results go, or the search itself); sweep training settings, prep settings and datasets.N.weight")
    return None


def space_problems(sweep: SweepConfig, validate) -> list[str]:
    """Every problem of the space, before any trial: ``validate(key, value)`` returns the config tree's message for
    a config with ``key`` set to ``value`` (or None when it is valid)."""
    problems = []
    if not sweep.space:
        problems.append("sweep.space: empty; give the keys to search, e.g. train.learning_rate: {low: 1e-5, high: "
                        "5e-4, log: true} (or --space FILE)")
    for key, dimension in sweep.space.items():
        fixed = fixed_key_problem(key)
        if fixed:
            problems.append(fixed)
            continue
        if isinstance(dimension, list) and not dimension:
            problems.append(f"sweep.space: {key}: no choices")
            continue
        if sweep.sampler == "grid" and isinstance(dimension, Range) and dimension.grid() is None:
            problems.append(f"sweep.space: {key}: sampler grid needs choices or a range with a step")
        for value in values_to_check(dimension):
            said = validate(key, value)
            if said:
                problems.append(f"sweep.space: {key}={value}: {said}")
                break
    return problems


def check_space(cfg) -> list[str]:
    """Every problem of cfg.sweep.space, each key's values validated by the config tree."""
    from tuneflow.core.loading import ConfigError, with_values

    def validate(key: str, value: Any) -> str | None:
        try:
            with_values(cfg, {key: value}, "sweep.space")
        except ConfigError as exc:
            return "; ".join(line.strip().removeprefix("- ").removeprefix(f"{key}: ")
                             for line in str(exc).splitlines())
        return None

    return space_problems(cfg.sweep, validate)
