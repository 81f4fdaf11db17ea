"""What stages hand each other: references that any machine can resolve, never local paths or models.

A model or dataset is a Hub repo at a commit SHA (or a local path with its content digest); everything a stage
writes for a later one is an artifact of that stage's MLflow run, named by run id, artifact path and digest
(`tuneflow.tracking.artifacts` resolves it to a local folder). This module imports pydantic only: the Prefect flows, the
training deployment and the training worker all read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneflow.core.config import TuneflowConfig

PREDICTIONS = "predictions.jsonl"  # the file inside EvalResult.predictions


class Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceRef(Ref):
    """A model or dataset as configured, pinned: a Hub repo at a commit, a local path at a content digest, or a model
    logged to MLflow at its model id."""

    kind: Literal["model", "dataset"]
    name: str = Field(description="Hub repo id, the local path as configured, or a models:/ URI.")
    revision: str = Field(description="Hub commit SHA, 'sha256:<digest>' of the local files, or the MLflow model id.")
    local_path: str | None = Field(None, description="Absolute path, for a local source only.")

    @property
    def source(self) -> str:
        return "local" if self.local_path else "mlflow" if self.name.startswith("models:/") else "hub"


class ArtifactRef(Ref):
    """A folder logged as an artifact of an MLflow run, with the digest of its content."""

    run_id: str
    path: str = Field(description="Artifact path inside the run, e.g. 'adapter'.")
    digest: str = Field(description="'sha256:<hex>' over the folder's relative file names and bytes.")

    @property
    def uri(self) -> str:
        return f"runs:/{self.run_id}/{self.path}"


class StageResult(BaseModel):
    mlflow_run_id: str


class DownloadResult(StageResult):
    model: SourceRef
    datasets: list[SourceRef]  # one per config.sources
    eval_dataset: SourceRef | None = None  # eval_dataset, when set

    @property
    def all_datasets(self) -> list[SourceRef]:
        """The training datasets, then eval_dataset when set: one per config.all_sources."""
        return [*self.datasets, *([self.eval_dataset] if self.eval_dataset else [])]


class PrepareResult(StageResult):
    data: ArtifactRef
    stats: dict
    cache_hit: bool


STOP_TAG = "tuneflow.stop"  # set on a train run (to why) to stop its training at the next evaluation


class TrainResult(StageResult):
    weights: ArtifactRef  # the adapter (qlora, lora) or the whole model (full, freeze)
    global_step: int
    train_loss: float
    resumed_from_step: int | None
    nproc: int = Field(description="Training processes on each node.")
    nnodes: int = Field(1, description="Machines that trained together.")
    world_size: int = Field(description="Training processes in all: nnodes x nproc.")
    precision: str = Field("", description="The compute precision train.precision resolved to on the machines.")
    attempts: int = 1
    stopped: str | None = Field(None, description="Why training stopped before its last step, when it was asked to "
                                "(a sweep's pruner sets the train run's tag tuneflow.stop); None: it ran to the end.")


class EvalResult(StageResult):
    metrics: dict[str, float]
    base_metrics: dict[str, float]
    predictions: ArtifactRef


class ExportResult(StageResult):
    model_id: str = Field(description="The MLflow logged model of the export: models:/<model_id>.")
    shards: list[str]
    parity: float


class TrainRequest(BaseModel):
    """Everything the training stage needs, on whichever machine it runs (the `tuneflow-train` flow's parameter)."""

    model_config = ConfigDict(extra="forbid")

    config: TuneflowConfig
    model: SourceRef
    data: ArtifactRef
    tracking_uri: str = Field(description="MLflow tracking URI the training logs to.")
    mlflow_run_id: str = Field(description="The pipeline's train run: metrics, checkpoints and the weights go there.")
    run_folder: str = Field(description="Name of the pipeline's run folder, reused for the local training folder.")
    node_rank: int = Field(0, ge=0, description="This node's rank among train.nnodes (node 0 hosts the rendezvous, "
                           "logs to MLflow and publishes the weights).")
    rendezvous_id: str | None = Field(None, description="Set by the train stage when train.nnodes > 1: the id the "
                                      "nodes of one attempt meet under (tuneflow.training.launch.rendezvous).")
