"""The config sections of evaluation and of the promotion gate: eval (held-out metrics, benchmarks, the judge) and
registry (the champion, its guards). Part of the one config tree of tuneflow.core.config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from tuneflow.core.section import Section


class BenchmarkConfig(Section):
    """One benchmark scored by lm-evaluation-harness for the base and the tuned model: a harness task, or the team's
    own multiple-choice set."""

    task: Optional[str] = Field(
        None, description="A lm-evaluation-harness task or group, e.g. mmlu, arc_easy, cmmlu, ceval-valid (its data "
        "comes from the Hub, through HF_ENDPOINT). Or set name and dataset instead.")
    name: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Your own multiple-choice set: its name in the metrics, `bench.NAME.acc`.")
    dataset: Optional[str] = Field(
        None, description="Its rows: a Hub dataset repo id, or a local .jsonl/.json/.parquet/.csv file or folder. "
        "Each row: question, choices (a list of strings), answer (the 0-based index, or the letter A, B, ...).")
    revision: str = Field("main", description="Branch, tag or commit of a Hub dataset (pinned to its commit).")
    split: str = Field("test", description="The split of a Hub dataset or folder: its data files named after it.")
    num_fewshot: int = Field(0, ge=0, le=25, description="Solved examples shown before each question.")
    limit: Optional[int] = Field(None, ge=1, description="Score at most this many questions (unset: all).")

    @model_validator(mode="after")
    def _one_kind(self) -> "BenchmarkConfig":
        if (self.task is None) == (self.dataset is None):
            raise ValueError("a benchmark is either a harness task (task: mmlu) or your own set (name and dataset)")
        if self.dataset is not None and not self.name:
            raise ValueError(f"benchmark with dataset {self.dataset}: name it (name: my-skills), for its metrics")
        return self

    @property
    def key(self) -> str:
        """Its name in the metrics: bench.<key>.acc."""
        return self.name or self.task


class JudgeConfig(Section):
    """A judge of tuned vs base answers (in retrain: challenger vs champion) on held-out prompts, in both orders."""

    model: str = Field(..., description="The judge: a Hub model id, a local folder or a models:/ URI, loaded here with "
                       "transformers; with base_url, the model name the endpoint serves.")
    revision: str = Field("main", description="Branch, tag or commit of a Hub judge (pinned to its commit).")
    base_url: Optional[str] = Field(None, description="An OpenAI-compatible endpoint that serves the judge, e.g. "
                                    "http://vllm:8000/v1; its key from the Prefect Secret api_key_secret, else "
                                    "OPENAI_API_KEY.")
    api_key_secret: Optional[str] = Field(None, description="A Prefect Secret block holding the endpoint's key.")
    max_new_tokens: int = Field(512, ge=1, le=8192, description="Tokens an endpoint judge may reply with.")
    samples: Optional[int] = Field(None, ge=1, description="Pairs judged (unset: every prompt evaluate answers).")
    elo_rounds: int = Field(1000, ge=1, le=100000, description="Random match orders the Elo ratings are averaged "
                            "over (seeded by train.seed).")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is not None and "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("credentials in the URL would be logged with the config; put the key in OPENAI_API_KEY "
                             "or a Prefect Secret (api_key_secret)")
        return v


class EvalConfig(Section):
    max_samples: int = Field(200, ge=1, description="Held-out examples used for generation metrics.")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="Tokens generated per answer (greedy).")
    batch_size: int = Field(8, ge=1, description="Prompts generated together (left-padded); the benchmarks' batch "
                            "and the judge's (an endpoint's requests in flight) too.")
    compare_base: bool = Field(True, description="Also score the untuned base model, for a base-vs-tuned table.")
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list, description="Benchmarks scored with lm-evaluation-harness for base and tuned, logged as "
        "`bench.NAME.acc` / `acc_norm` (and `base.bench.*`); e.g. [{task: mmlu, num_fewshot: 5, limit: 100}, "
        "{name: my-skills, dataset: data/mc.jsonl}].")
    judge: Optional[JudgeConfig] = Field(None, description="Pairwise judging of tuned vs base answers (with "
                                         "compare_base), and in retrain of challenger vs champion for a judge.* guard; "
                                         "e.g. {model: org/judge-model}.")

    @field_validator("benchmarks")
    @classmethod
    def _distinct(cls, v: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        keys = [b.key for b in v]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"two benchmarks named {', '.join(twice)}: their metrics would overwrite each other")
        return v


METRIC_DIRECTIONS = {  # held-out metrics evaluate reports, and whether a greater value is better
    "eval_loss": False, "perplexity": False, "bleu-4": True, "rouge-1": True, "rouge-2": True, "rouge-l": True,
    "pref_accuracy": True, "pref_margin": True,  # on preference pairs (train.objective dpo)
}
PAIR_METRICS = ("pref_accuracy", "pref_margin")
JUDGE_DIRECTIONS = {"judge.win_rate": True, "judge.loss_rate": False, "judge.consistency": True, "judge.elo": True}


class GuardConfig(Section):
    """A limit the challenger must keep to be promoted, besides winning on registry.metric."""

    metric: str = Field(..., description="A held-out metric (eval_loss, rouge-l, ...) or a benchmark's, "
                        "`bench.NAME.acc` or `.acc_norm` (NAME: the task or set), scored for challenger and champion "
                        "on the same data.")
    max_drop: Optional[float] = Field(
        None, ge=0, description="How far the challenger may fall behind the champion on it (in its worse direction).")
    min: Optional[float] = Field(None, description="A floor the challenger must reach (a first version too).")
    max: Optional[float] = Field(None, description="A ceiling the challenger must stay under, e.g. for eval_loss.")

    @model_validator(mode="after")
    def _a_limit(self) -> "GuardConfig":
        if self.max_drop is None and self.min is None and self.max is None:
            raise ValueError(f"guard on {self.metric}: give it a limit, max_drop, min or max")
        if self.metric in JUDGE_DIRECTIONS and self.max_drop is not None:
            raise ValueError(f"guard on {self.metric}: the judge compares challenger and champion; use min or max")
        return self

    @property
    def maximize(self) -> bool:
        return {**METRIC_DIRECTIONS, **JUDGE_DIRECTIONS}.get(self.metric, True)  # benchmarks' accuracies too


class RegistryConfig(Section):
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=120, description="MLflow "
                                   "registered model that `tuneflow retrain` registers each new export as a version "
                                   "of, and whose `champion` alias it moves when a challenger wins. Required by "
                                   "retrain; unused by run.")
    metric: Literal["eval_loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "pref_accuracy",
                    "pref_margin"] = Field(
        "eval_loss", description="Held-out metric that decides between champion and challenger, scored for both on "
        "the same frozen evaluation set (pref_accuracy, pref_margin: on preference pairs, train.objective dpo).",
    )
    greater_is_better: bool | None = Field(None, description="Whether a greater registry.metric is better; unset: "
                                           "false for eval_loss and perplexity, true for BLEU and ROUGE.")
    min_delta: float = Field(
        0.0, ge=0, description="How much the challenger must beat the champion by on registry.metric to be promoted.",
    )
    eval_samples: int = Field(
        64, ge=1, description="Rows of the frozen evaluation set, drawn once from the held-out rows the first retrain "
        "of the name scored (at most eval.max_samples).",
    )
    guards: list[GuardConfig] = Field(
        default_factory=list, description="Limits a challenger must also keep to be promoted, e.g. [{metric: "
        "bench.mmlu.acc, max_drop: 0.01}, {metric: rouge-l, min: 20}]: general skills it must not forget.",
    )

    @property
    def maximize(self) -> bool:
        return METRIC_DIRECTIONS[self.metric] if self.greater_is_better is None else self.greater_is_better
