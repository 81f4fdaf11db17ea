"""The contract between the train stage and the training worker: what torchrun's ranks read, what rank 0 writes.

    <train folder>/spec.json     TrainSpec, written before the launch
    <train folder>/result.json   TrainOutcome, written by rank 0 when training ends
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from tuneflow.core.config import TuneflowConfig


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: TuneflowConfig
    model_dir: str  # the base model's folder on this machine
    data_dir: str  # the prepared DatasetDict on this machine
    output_dir: str  # checkpoints/, the final weights, result.json, errors/
    init_adapter_dir: str | None = None  # train.preference.init_adapter on this machine


class TrainOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights_dir: str
    global_step: int
    train_loss: float
    resumed_from_step: int | None
    log_history: list[dict]
    stopped: str | None = None  # asked to stop (the train run's tag tuneflow.stop): why
