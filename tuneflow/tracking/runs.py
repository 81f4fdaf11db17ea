"""MLflow runs owned by the flow: one parent per flow run, one child per stage.

Training processes attach to their stage's run through MLFLOW_RUN_ID instead of starting runs of their own, so a
multi-process job still leaves exactly one run per stage. Every run ends FINISHED or FAILED, never RUNNING.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

MAX_PARAM_LEN = 6000


EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")  # the MLflow UI opens the model-training view, not GenAI


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp = client.get_experiment(client.create_experiment(name))
        except Exception:  # created meanwhile by a concurrent flow
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND[0] not in exp.tags:  # a kind chosen by hand in the UI is kept
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def artifact_source(uri: str):
    """A DatasetSource for data stored as an MLflow artifact (``runs:/<run>/<path>``), which MLflow has none of."""
    from mlflow.data.dataset_source import DatasetSource

    class MlflowArtifactSource(DatasetSource):
        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "mlflow_artifact"

        def load(self, dst_path=None):
            from mlflow.artifacts import download_artifacts

            return download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

        @staticmethod
        def _can_resolve(raw_source) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("runs:/")

        @classmethod
        def _resolve(cls, raw_source):
            return cls(raw_source)

        def to_dict(self) -> dict:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict):
            return cls(source_dict["uri"])

    return MlflowArtifactSource(uri)


def log_dataset(client: MlflowClient, run_id: str, name: str, digest: str, source, context: str) -> None:
    """Record a dataset as an input of the run (the runs view's Dataset column): its name, digest and source
    (a Hub repo at a commit, or a local path); ``context`` is training or evaluation."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    from tenacity import retry, retry_if_exception, stop_after_attempt, wait_fixed

    entity = MetaDataset(source=source, name=name, digest=digest.removeprefix("sha256:")[:36])._to_mlflow_entity()
    inputs = [DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    retry(retry=retry_if_exception(_created_meanwhile), stop=stop_after_attempt(4), wait=wait_fixed(0.5),
          reraise=True)(client.log_inputs)(run_id, datasets=inputs)


def _created_meanwhile(exc: BaseException) -> bool:
    """Two runs logging the same dataset at once: the MLflow server's get-or-create of the dataset row races, and the
    second insert fails on the row's unique key (SQLite or PostgreSQL); logged again, it finds the row."""
    text = str(exc)
    return "UNIQUE constraint failed: datasets." in text or (
        "duplicate key value violates unique constraint" in text and "dataset" in text)


def log_params(client: MlflowClient, run_id: str, params: dict[str, object]) -> None:
    items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


@contextlib.contextmanager
def child_run(client: MlflowClient, exp_id: str, parent_run_id: str, name: str) -> Iterator[str]:
    """A stage's run under the flow's parent run; FAILED if the block raises."""
    run = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id, "tuneflow.stage": name})
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def run_url(uri: str, exp_id: str, run_id: str | None = None) -> str:
    """Where the run (or the experiment's runs) shows in the MLflow UI, in its model-training view (for a local
    store: once `mlflow ui` serves it on port 5000)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base}/#/experiments/{exp_id}/{page}?workflowType=machine_learning"


def log_model(uri: str, parent_run_id: str, stage_run_id: str, model, tokenizer, dtype: str,
              metrics: dict[str, float]) -> str:
    """Log an exported model as an MLflow model (transformers flavour, chat task) of the pipeline's parent run (so
    the runs view's Models column shows it, and the model page carries the run's params), also as an output of the
    stage run, with ``metrics`` linked to it; return its model id."""
    from importlib.metadata import version

    import mlflow
    from mlflow.entities import LoggedModelOutput

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    # Created here, in the run's experiment: left to log_model it would land in the process's current experiment.
    created = client.create_logged_model(parent.info.experiment_id, name="model", source_run_id=parent_run_id,
                                         params=parent.data.params, tags={"tuneflow.dtype": dtype})
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name="model", task="llm/v1/chat", run_id=parent_run_id,
        model_id=created.model_id,
        pip_requirements=[f"{p}=={version(p)}" for p in ("transformers", "torch", "accelerate")],
    )
    client.log_outputs(stage_run_id, [LoggedModelOutput(info.model_id, step=0)])
    ts = int(time.time() * 1000)
    client.log_batch(stage_run_id, metrics=[Metric(k, float(v), ts, 0, model_id=info.model_id)
                                            for k, v in metrics.items()])
    return info.model_id
