"""The tuneflow pipeline as one Prefect flow: download -> prepare -> train -> evaluate -> export.

    tuneflow run --config configs/demo.yaml                            # on this machine, from the command line
    make deploy; prefect deployment run 'tuneflow-finetune/on-demand'  # on a team's Prefect server (README)

Each stage is a Prefect task with its own MLflow run under one parent run per flow run. Stages hand each other
references (Hub commits, MLflow artifacts with digests), never models or local paths, so training can run on a GPU
worker (`train_deployment`) while the other stages run wherever this flow runs. When the flow ends,
<run folder>/summary.json (also logged to the MLflow parent run) says what happened.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from tasks.download import download
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.prepare import prepare
from tasks.train import train
from tuneflow.core.config import TuneflowConfig, tracking_uri
from tuneflow.placement.pool import placement_problem
from tuneflow.tracking.run_record import RunRecord
from tuneflow.tracking.servers import check_mlflow


@flow(name="tuneflow-finetune")
def finetune(config: TuneflowConfig, train_deployment: str | None = None, run_dir: str | None = None,
             mlflow_tags: dict[str, str] | None = None) -> dict:
    """Fine-tune a model on an instruction dataset; returns the run's summary (also its summary.json).

    Args:
        config: The whole run: model, dataset, prep, training, evaluation, export, tracking.
        train_deployment: Run training as a flow run of this deployment, e.g. tuneflow-train/gpu on the gpu work
            pool. Empty: train on the machine that runs this flow.
        run_dir: Use this run folder instead of a new one.
        mlflow_tags: Tags of the pipeline's MLflow run (a sweep nests its trials under its run with
            mlflow.parentRunId).
    """
    logger = get_run_logger()
    cfg = TuneflowConfig.model_validate(config.model_dump())  # the Prefect UI cannot run model validators
    for ignored in cfg.ignored_settings():
        logger.warning(ignored)
    problem = placement_problem(cfg, train_deployment)  # several nodes without the training deployment
    if not train_deployment and not problem:  # training runs here: an optimizer this machine cannot run
        from tuneflow.modeling.precision import machine_problem

        problem = machine_problem(cfg)
    if problem:
        raise ValueError(problem)
    check_mlflow(tracking_uri(cfg.tracking.uri))  # refused credentials: one line naming the server, before any work
    record = RunRecord(cfg, run_dir, logger, mlflow_tags)
    ctx = record.ctx
    with record.failing_on_error():
        downloaded = record.stage("download", download, cfg, ctx)
        prepared = record.stage("prepare", prepare, cfg, downloaded, ctx)
        trained = record.stage("train", train, cfg, downloaded, prepared, ctx, train_deployment)
        if trained.stopped:  # asked to stop (a sweep's pruner): its checkpoints and weights are kept, nothing to score
            logger.warning("training stopped after step %d (%s): evaluate and export skipped", trained.global_step,
                           trained.stopped)
            record.skip("evaluate")
            record.skip("export")
            return record.finish("stopped")
        evaluated = record.stage("evaluate", evaluate, cfg, downloaded, prepared, trained, ctx)
        if cfg.export.enabled:
            record.stage("export", export, cfg, downloaded, trained, evaluated, ctx)
        else:
            record.skip("export")
    return record.finish()
