"""The tuneflow pipeline as one Prefect flow: download -> prepare -> train -> evaluate -> export.

    tuneflow run --config configs/demo.yaml                 # from the command line
    prefect deploy --all  (see deployments/prefect.yaml)    # for the Prefect UI and scheduled retraining

Each stage is a Prefect task with its own MLflow run under one parent run per flow run. Stages hand each other
folders, SHAs and run ids, never models. When the flow ends, <run folder>/summary.json says what happened.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from tasks.context import RunContext
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.prepare import prepare
from tasks.train import train
from tuneflow.config import TuneflowConfig, flatten
from tuneflow.tracking import experiment_id, log_metrics, log_params, run_url, tracking_uri

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


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return path


@flow(name="tuneflow-finetune", log_prints=True)
def finetune(config: TuneflowConfig, run_dir: str | None = None) -> str:
    """Fine-tune a model on an instruction dataset; returns the path of summary.json."""
    logger = get_run_logger()
    # The Prefect UI cannot run model validators: validate the whole tree again here.
    cfg = TuneflowConfig.model_validate(config.model_dump())
    folder = Path(run_dir).resolve() if run_dir else new_run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))

    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    uri = tracking_uri(cfg.tracking.uri)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment)
    parent = client.create_run(exp_id, run_name=folder.name, tags={"tuneflow.run_dir": str(folder)}).info.run_id
    log_params(client, parent, flatten(cfg))
    ctx = RunContext(run_dir=str(folder), tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent)
    logger.info("run folder %s, MLflow run %s (%s)", folder, parent, uri)

    summary: dict = {
        "status": "running",
        "run_dir": str(folder),
        "mlflow": {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent},
        "stages": {name: {"status": "pending"} for name in STAGES},
    }
    results: dict = {}

    def stage(name: str, fn, *args):
        summary["stages"][name]["status"] = "running"
        start = time.perf_counter()
        result = fn(*args)
        summary["stages"][name] = {
            "status": "completed", "mlflow_run_id": result.mlflow_run_id, "seconds": round(time.perf_counter() - start, 1)
        }
        results[name] = result
        return result

    try:
        dl = stage("download", download, cfg, ctx)
        summary["lineage"] = {"model_revision": dl.model.revision, "dataset_revision": dl.dataset.revision}
        prep = stage("prepare", prepare, cfg, dl, ctx)
        summary["stages"]["prepare"].update(cache_hit=prep.cache_hit, stats=prep.stats)
        trained = stage("train", train, cfg, dl, prep, ctx)
        summary["stages"]["train"].update(
            global_step=trained.global_step, train_loss=trained.train_loss,
            resumed_from_step=trained.resumed_from_step, nproc=trained.nproc,
        )
        summary["adapter_dir"] = trained.weights_dir
        evaluated = stage("evaluate", evaluate, cfg, dl, prep, trained, ctx)
        summary["metrics"] = {**evaluated.metrics, "base": evaluated.base_metrics}
        if cfg.export.enabled:
            exported = stage("export", export, cfg, dl, trained, evaluated, ctx)
            summary["export_dir"] = exported.export_dir
            summary["metrics"]["export_parity"] = exported.parity
            summary["stages"]["export"].update(shards=exported.shards)
        else:
            summary["stages"]["export"]["status"] = "skipped"
    except BaseException as exc:
        failed = next((n for n, s in summary["stages"].items() if s["status"] == "running"), None)
        if failed:
            summary["stages"][failed] = {"status": "failed", "error": str(exc)}
            child = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                                 f"tags.mlflow.runName = '{failed}'", max_results=1)
            if child:
                summary["stages"][failed]["mlflow_run_id"] = child[0].info.run_id
        summary.update(status="failed", failed_stage=failed, error=f"{type(exc).__name__}: {exc}")
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FAILED))
        write_summary(folder, summary)
        raise

    summary["status"] = "completed"
    final = {k: v for k, v in summary["metrics"].items() if k != "base"}
    log_metrics(client, parent, {**final, **{f"base.{k}": v for k, v in evaluated.base_metrics.items()}})
    path = write_summary(folder, summary)
    client.log_artifact(parent, str(path))
    client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))

    create_markdown_artifact(
        key="tuneflow-metrics",
        markdown=f"# {folder.name}\n\n{metrics_table(evaluated.metrics, evaluated.base_metrics)}\n",
        description="Held-out metrics, base vs tuned",
    )
    create_link_artifact(key="tuneflow-mlflow-run", link=run_url(uri, exp_id, parent), link_text="MLflow parent run")
    return str(path)
