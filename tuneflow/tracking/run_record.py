"""The bookkeeping of one pipeline run, kept beside the flow so that the flow reads as the DAG.

A run folder `<output_dir>/<run_name>-<time>-<suffix>` holding config.json and summary.json; one MLflow parent run
(the whole config as params, the final metrics, summary.json) under which every stage opens its own child run; and,
at the end, Prefect artifacts with the metrics table and a link to the MLflow run. Whatever happens, summary.json
and the MLflow runs end completed or failed, never running.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from pathlib import Path

from pydantic import BaseModel

from tuneflow.core.config import TuneflowConfig, tracking_uri
from tuneflow.core.files import staged
from tuneflow.core.params import config_hash, flatten
from tuneflow.core.results import DownloadResult, EvalResult, ExportResult, PrepareResult, SourceRef, TrainResult
from tuneflow.tracking.context import RunContext
from tuneflow.tracking.runs import experiment_id, log_dataset, log_metrics, log_params, run_url

STAGES = ("download", "prepare", "train", "evaluate", "export")
SUMMARY_METRICS = ("eval_loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l")


def new_run_dir(cfg: TuneflowConfig) -> Path:
    """<output_dir>/<run_name>-<time>-<random>: two runs of one config never share a folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output_dir) / f"{cfg.run_name}-{stamp}-{secrets.token_hex(3)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir.resolve()


def metrics_table(metrics: dict, base: dict) -> str:
    lines = ["| metric | base | tuned |", "|---|---|---|"]
    for key in SUMMARY_METRICS:
        if key in metrics:
            b = f"{base[key]:.4f}" if key in base else "-"
            lines.append(f"| {key} | {b} | {metrics[key]:.4f} |")
    return "\n".join(lines)


def stage_details(result: BaseModel) -> dict:
    """What summary.json records of a stage's result, besides its status, MLflow run and duration."""
    if isinstance(result, PrepareResult):
        return {"cache_hit": result.cache_hit, "stats": result.stats, "data": result.data.uri}
    if isinstance(result, TrainResult):
        return {"global_step": result.global_step, "train_loss": result.train_loss, "nproc": result.nproc,
                "nnodes": result.nnodes, "world_size": result.world_size,
                "resumed_from_step": result.resumed_from_step, "attempts": result.attempts,
                "weights": result.weights.uri, **({"stopped": result.stopped} if result.stopped else {})}
    if isinstance(result, EvalResult):
        return {"predictions": result.predictions.uri}
    if isinstance(result, ExportResult):
        return {"shards": result.shards, "model_uri": f"models:/{result.model_id}"}
    return {}


def tuneflow_version() -> str:
    from importlib.metadata import version

    return version("tuneflow")


def dataset_source(ref: SourceRef, split: str):
    """Where MLflow says a dataset comes from: the Hub repo at its commit, or the local path."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    if ref.local_path:
        return resolve_dataset_source(ref.local_path)
    return HuggingFaceDatasetSource(path=ref.name, revision=ref.revision, split=split)


def prepare_benchmarks(cfg: TuneflowConfig, folder: Path, client, run_id: str, logger,
                       keys: set[str] | None = None):
    """cfg.eval.benchmarks (only those named in ``keys``, if given) ready to score
    (`tuneflow.sources.benchmarks.Prepared`), each team set's pinned source an evaluation input `bench.<name>` of the
    run; None when there are none."""
    benchmarks = [b for b in cfg.eval.benchmarks if keys is None or b.key in keys]
    if not benchmarks:
        return None
    from tuneflow.sources.benchmarks import only, prepare

    prepared = prepare(only(cfg, benchmarks), folder, logger)
    splits = {b.key: b.split for b in benchmarks}
    for key, ref in prepared.sources.items():
        log_dataset(client, run_id, f"bench.{key}", ref.revision, dataset_source(ref, splits[key]), "evaluation")
    return prepared


class RunRecord:
    def __init__(self, cfg: TuneflowConfig, run_dir: str | None, logger, tags: dict[str, str] | None = None):
        from mlflow import MlflowClient
        from prefect.runtime import flow_run

        self.folder = Path(run_dir).resolve() if run_dir else new_run_dir(cfg)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
        uri = tracking_uri(cfg.tracking.uri)
        self.client = MlflowClient(uri)
        exp_id = experiment_id(self.client, cfg.tracking.experiment)
        tags = {"tuneflow.run_dir": str(self.folder), "prefect.flow_run_id": str(flow_run.id),
                "tuneflow.config_hash": config_hash(cfg), "tuneflow.version": tuneflow_version(), **(tags or {})}
        self.parent = self.client.create_run(exp_id, run_name=self.folder.name, tags=tags).info.run_id
        log_params(self.client, self.parent, flatten(cfg))
        self.ctx = RunContext(run_dir=str(self.folder), tracking_uri=uri, experiment_id=exp_id,
                              parent_run_id=self.parent)
        self.downloaded: DownloadResult | None = None
        self.prepared: PrepareResult | None = None
        self.summary: dict = {
            "status": "running",
            "run_dir": str(self.folder),
            "mlflow": {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": self.parent},
            "stages": {name: {"status": "pending"} for name in STAGES},
        }
        logger.info("run folder %s, MLflow run %s (%s)", self.folder, self.parent, uri)

    def stage(self, name: str, fn, *args):
        """Run one stage task and record its outcome."""
        self.summary["stages"][name]["status"] = "running"
        start = time.perf_counter()
        result = fn(*args)
        self.summary["stages"][name] = {"status": "completed", "mlflow_run_id": result.mlflow_run_id,
                                        "seconds": round(time.perf_counter() - start, 1), **stage_details(result)}
        if isinstance(result, DownloadResult):
            self.downloaded = result
            self.summary["lineage"] = {"model_revision": result.model.revision,  # several datasets: joined by ","
                                       "dataset_revision": ",".join(ref.revision for ref in result.datasets)}
            if result.eval_dataset is not None:
                self.summary["lineage"]["eval_dataset_revision"] = result.eval_dataset.revision
        elif isinstance(result, PrepareResult):
            self.prepared = result
            self.log_data(self.parent, "train", "training")
            self.log_data(self.parent, "eval", "evaluation")
        elif isinstance(result, TrainResult):
            self.log_data(result.mlflow_run_id, "train", "training")
            if result.precision:
                log_params(self.client, self.parent, {"train.precision_resolved": result.precision})
            if (self.folder / "train" / result.weights.path).is_dir():
                self.summary["adapter_dir"] = str(self.folder / "train" / result.weights.path)  # trained here
        elif isinstance(result, EvalResult):
            self.log_data(result.mlflow_run_id, "eval", "evaluation")
            self.summary["metrics"] = {**result.metrics, "base": result.base_metrics}
        elif isinstance(result, ExportResult):
            self.summary["export_dir"] = str(self.folder / "export")
            self.summary["model_uri"] = f"models:/{result.model_id}"
            self.summary["metrics"]["export_parity"] = result.parity
        return result

    def log_data(self, run_id: str, split: str, context: str) -> None:
        """The prepared split as MLflow dataset inputs of ``run_id``, one per dataset its rows come from (the training
        datasets; eval_dataset for the eval split, when set), each named after it, with the digest of the prepared
        data and that dataset's source (Hub repo at its commit, or local path)."""
        d = self.downloaded
        for source in [d.eval_dataset] if split == "eval" and d.eval_dataset else d.datasets:
            log_dataset(self.client, run_id, f"{source.name}#{split}", self.prepared.data.digest,
                        dataset_source(source, split), context)

    def skip(self, name: str) -> None:
        self.summary["stages"][name]["status"] = "skipped"

    @contextlib.contextmanager
    def failing_on_error(self):
        """A stage that raises: marked failed in summary.json (with its MLflow run) and the parent run FAILED."""
        from mlflow.entities import RunStatus

        try:
            yield
        except BaseException as exc:
            failed = next((n for n, s in self.summary["stages"].items() if s["status"] == "running"), None)
            if failed:
                self.summary["stages"][failed] = {"status": "failed", "error": str(exc)}
                child = self.client.search_runs(
                    [self.ctx.experiment_id],
                    f"tags.mlflow.parentRunId = '{self.parent}' and tags.mlflow.runName = '{failed}'", max_results=1)
                if child:
                    self.summary["stages"][failed]["mlflow_run_id"] = child[0].info.run_id
            self.summary.update(status="failed", failed_stage=failed, error=f"{type(exc).__name__}: {exc}")
            self.client.log_artifact(self.parent, str(self.write_summary()))
            self.client.set_terminated(self.parent, RunStatus.to_string(RunStatus.FAILED))
            raise

    def write_summary(self) -> Path:
        path = self.folder / "summary.json"
        with staged(path) as tmp:
            tmp.write_text(json.dumps(self.summary, indent=2))
        return path

    def finish(self, status: str = "completed") -> dict:
        """Final metrics on the parent run, summary.json written and logged, the Prefect artifacts (``status``:
        completed, or stopped when training was asked to stop early)."""
        from mlflow.entities import RunStatus
        from prefect.artifacts import create_link_artifact, create_markdown_artifact

        self.summary["status"] = status
        metrics = self.summary.get("metrics", {})
        base = metrics.get("base", {})
        log_metrics(self.client, self.parent, {**{k: v for k, v in metrics.items() if k != "base"},
                                               **{f"base.{k}": v for k, v in base.items()}})
        self.client.log_artifact(self.parent, str(self.write_summary()))
        self.client.set_terminated(self.parent, RunStatus.to_string(RunStatus.FINISHED))
        create_markdown_artifact(key="tuneflow-metrics", description="Held-out metrics, base vs tuned",
                                 markdown=f"# {self.folder.name}\n\n{metrics_table(metrics, base)}\n")
        create_link_artifact(key="tuneflow-mlflow-run", link_text="MLflow parent run",
                             link=run_url(self.ctx.tracking_uri, self.ctx.experiment_id, self.parent))
        return self.summary
