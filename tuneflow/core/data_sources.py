"""Where a run's rows come from: a dataset (Hub repo or local files), how to read its rows, and its share of a mix.

    dataset: {name_or_path: org/data, format: alpaca, columns: {instruction: question, output: answer}}
    datasets: [{name_or_path: org/a, weight: 3}, {name_or_path: org/b}]        # several, mixed
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneflow.core.section import Section

# dataset.format -> the fields a row of it has (dataset.columns maps them onto the file's own column names)
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output", "system", "history"),
                 "sharegpt": ("conversations", "system"), "messages": ("messages",),
                 "preference": ("prompt", "messages", "chosen", "rejected", "instruction", "input", "system",
                                "history", "conversations")}


class SourceConfig(Section):
    """A dataset: where its rows are and how to read them."""

    name_or_path: str = Field(
        ..., min_length=1, description="Hub dataset repo id, or a local .json/.jsonl/.parquet/.csv file or folder."
    )
    revision: str = Field("main", min_length=1, description="Branch, tag or commit of the Hub dataset repo.")
    format: Literal["alpaca", "sharegpt", "messages", "preference"] = Field(
        "alpaca",
        description="alpaca: instruction/input/output[/system/history]; sharegpt: conversations of from/value; "
        "messages: role/content lists; preference (train.objective dpo): a prompt with a chosen and a rejected "
        "answer, as TRL lays them out (prompt or messages, chosen, rejected) or LLaMA-Factory (alpaca or sharegpt "
        "rows with chosen and rejected).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="The format's fields read from the file's own columns, as LLaMA-Factory's "
        "dataset_info maps them, e.g. {instruction: question, input: context, output: answer} for alpaca, "
        "{conversations: dialog} for sharegpt, {messages: chat} for messages.")
    split: str | None = Field(
        None, min_length=1, description="Read only this split's files of a folder or Hub repo, named as the Hub "
        "names them (train.jsonl, data/test-00000-of-00001.parquet, train/part.json); unset: every data file.")
    max_samples: int | None = Field(
        None, ge=1, description="Use at most this many rows (the first valid ones); unset: all.")

    @model_validator(mode="after")
    def _known_fields(self) -> "SourceConfig":
        fields = FORMAT_FIELDS[self.format]
        unknown = sorted(set(self.columns) - set(fields))
        if unknown:
            raise ValueError(f"columns: {', '.join(unknown)} is no field of format {self.format}; its fields are "
                             f"{', '.join(fields)}")
        return self


class DatasetConfig(SourceConfig):
    weight: float = Field(
        1.0, gt=0, description="With datasets: this source's share of the training mix, relative to the others' "
        "(3 and 1: three rows of it for each row of the other); see prep.mix_strategy.")
    eval_size: float = Field(
        0.05, gt=0, description="Held-out evaluation split: a fraction if < 1, a row count if >= 1 (fixed seed); "
        "of each source on its own; unused with eval_dataset."
    )

    @field_validator("eval_size")
    @classmethod
    def _whole_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("a count of rows (>= 1) must be a whole number, or use a fraction below 1")
        return v
