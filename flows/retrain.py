"""Retraining as one Prefect flow: train only when the base model, the dataset or the config changed, register the
export in the MLflow Model Registry, and promote it over the champion only when it wins on the frozen evaluation set.

    tuneflow retrain --config configs/demo.yaml --set registry.model_name=demo   # here; decision: last stdout line
    make deploy; prefect deployment schedule resume ...          # tuneflow-retrain/scheduled on a team's server
    tuneflow emit-dataset-updated --dataset org/data             # the event the scheduled deployment also runs on

Steps: pin the model and dataset commits and hash the config; a registered version trained from exactly those ends
the run as `skipped`, before any download or GPU time. Otherwise the pipeline (`tuneflow-finetune`, training on the
`gpu` pool in team mode) runs as a subflow, then `decide` scores challenger, champion and base model on the frozen
evaluation set, registers the export as a new version and moves the aliases (`tuneflow.tracking.registry`). The decision
is the flow's return value, a Prefect markdown artifact, and tags on the model versions and MLflow runs.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.finetune import finetune
from tuneflow.core.config import METRIC_DIRECTIONS, TuneflowConfig


@task(name="fingerprint", cache_policy=NO_CACHE)
def fingerprint_task(cfg: TuneflowConfig):
    from tuneflow.tracking.registry import fingerprint

    fp = fingerprint(cfg, get_run_logger())
    get_run_logger().info("pinned: %s", fp.describe())
    return fp


@task(name="decide", cache_policy=NO_CACHE)
def decide_task(cfg: TuneflowConfig, summary: dict, fp, frozen: list[dict] | None):
    """Score challenger, champion and base on the frozen set; register the challenger; move the aliases."""
    import json
    from importlib.metadata import version as package_version

    from mlflow.artifacts import download_artifacts
    from prefect.runtime import flow_run

    from tuneflow.core.results import PREDICTIONS
    from tuneflow.modeling.load import device
    from tuneflow.modeling.metrics import preference
    from tuneflow.sources.hub import fetch
    from tuneflow.sources.registered import registered_folder
    from tuneflow.tracking.judging import judge_and_log
    from tuneflow.tracking.registry import (
        CHALLENGER,
        CHAMPION,
        PREVIOUS,
        Decision,
        Registry,
        decide,
        draw_eval_set,
        score,
    )
    from tuneflow.tracking.run_record import prepare_benchmarks
    from tuneflow.tracking.runs import artifact_source, child_run, log_dataset, log_metrics

    logger = get_run_logger()
    registry, metric = Registry(cfg), cfg.registry.metric
    client, mlflow_info = registry.client, summary["mlflow"]
    trained = fp.at(summary["lineage"])  # the commits the pipeline trained from, which the skip check matches
    base_ref = trained.model
    with child_run(client, mlflow_info["experiment_id"], mlflow_info["parent_run_id"], "decide") as run_id:
        if frozen is None:  # the name's first decision, or --refreeze-eval-set: from the rows evaluate scored
            folder = download_artifacts(run_id=summary["stages"]["evaluate"]["mlflow_run_id"],
                                        artifact_path=f"predictions/{PREDICTIONS}", tracking_uri=registry.uri)
            with open(folder, encoding="utf-8") as fh:
                records = [json.loads(line) for line in fh]
            frozen = draw_eval_set(records, cfg.registry.eval_samples)
            eval_set = registry.freeze(run_id, frozen)
            logger.info("decide: froze %d held-out rows as %s's evaluation set (%s)", len(frozen), registry.name,
                        eval_set.uri)
        else:
            eval_set = registry.eval_set_ref()
        log_dataset(client, run_id, f"{registry.name}#frozen-eval", eval_set.digest, artifact_source(eval_set.uri),
                    "evaluation")

        champion = registry.alias(CHAMPION)
        models = {"challenger": registered_folder(summary["model_uri"], registry.uri),
                  "base": fetch(base_ref, cfg, logger)}
        if champion is not None:
            models["champion"] = registered_folder(f"models:/{registry.name}/{champion.version}", registry.uri)
        guarded = prepare_benchmarks(cfg, Path(summary["run_dir"]) / "decide" / "benchmarks", client, run_id, logger,
                                     keys={b.key for b in cfg.eval.benchmarks for g in cfg.registry.guards
                                           if g.metric in (f"bench.{b.key}.acc", f"bench.{b.key}.acc_norm")})
        all_scores, answers, logps = {}, {}, {}
        for who, folder in models.items():
            all_scores[who], answers[who], logps[who] = score(folder, frozen, cfg, guarded if who != "base" else None)
        if logps["base"] is not None:  # preference pairs: each model's implicit reward, the base as reference
            for who, scores in all_scores.items():
                scores.update(preference(*logps[who], *logps["base"], cfg.train.preference.beta))
        for who, scores in all_scores.items():
            logger.info("decide: %s on the frozen set: %s", who, json.dumps(scores))
            log_metrics(client, run_id, {f"{who}.{k}": v for k, v in scores.items()})
        if any(g.metric.startswith("judge.") for g in cfg.registry.guards):  # the champion, else the base, as opponent
            judged = judge_and_log(cfg, client, run_id, logger, frozen, answers["challenger"],
                                   answers["champion" if champion is not None else "base"], {"": device()})
            all_scores["challenger"].update(judged)
            log_metrics(client, run_id, {f"challenger.{k}": v for k, v in judged.items()})
        scores = {who: s[metric] for who, s in all_scores.items()}
        promote, reason, guards = decide(cfg, all_scores["challenger"], all_scores.get("champion"), all_scores["base"])

        tags = {**trained.tags(), "tuneflow.version": package_version("tuneflow"),
                "prefect.flow_run_id": str(flow_run.id),
                **{f"tuneflow.metric.{k}": f"{v:.6g}" for k, v in summary["metrics"].items()
                   if k in METRIC_DIRECTIONS or k == "export_parity"},
                f"tuneflow.frozen_eval.{metric}": f"{scores['challenger']:.6g}",
                "tuneflow.decision": "promoted" if promote else "kept", "tuneflow.reason": reason,
                **{f"tuneflow.guard.{g['metric']}": guard_tag(g) for g in guards}}
        model_id = summary["model_uri"].removeprefix("models:/")
        version = registry.register(model_id, summary["stages"]["export"]["mlflow_run_id"], tags, eval_set)
        client.set_registered_model_alias(registry.name, CHALLENGER, version)
        if champion is not None:
            client.set_model_version_tag(registry.name, champion.version, "tuneflow.last_challenge",
                                         f"v{version} {'promoted' if promote else 'kept'}: {reason}")
            client.set_model_version_tag(registry.name, champion.version, f"tuneflow.frozen_eval.{metric}",
                                         f"{scores['champion']:.6g}")
        if promote:
            if champion is not None:
                client.set_registered_model_alias(registry.name, PREVIOUS, champion.version)
            client.set_registered_model_alias(registry.name, CHAMPION, version)
        now = registry.alias(CHAMPION)
        decision = Decision("promoted" if promote else "kept", registry.name, version,
                            int(now.version) if now else None, metric, scores, reason,
                            [{k: v for k, v in g.items() if k != "why"} for g in guards])
        for run in (run_id, mlflow_info["parent_run_id"]):
            for key, value in (("tuneflow.decision", decision.decision), ("tuneflow.reason", reason),
                               ("tuneflow.registered_version", str(version))):
                client.set_tag(run, key, value)
        return decision


def guard_tag(g: dict) -> str:
    figures = ", ".join(f"{who} {g[who]:.6g}" for who in ("challenger", "champion") if g[who] is not None)
    return f"{'holds' if g['passed'] else 'fails'} ({figures}; {g['limit']})"


@flow(name="tuneflow-retrain")
def retrain(config: TuneflowConfig, train_deployment: str | None = None, refreeze_eval_set: bool = False) -> dict:
    """Retrain when the model, the dataset or the config changed; register the export and promote it if it wins.

    Args:
        config: The pipeline config, with registry.model_name set (the registered model to retrain).
        train_deployment: Run training as a flow run of this deployment, e.g. tuneflow-train/gpu on the gpu work
            pool. Empty: train on the machine that runs this flow.
        refreeze_eval_set: Replace the frozen evaluation set with rows from this run's held-out split.
    """
    from prefect.artifacts import create_markdown_artifact

    from tuneflow.core.config import tracking_uri
    from tuneflow.tracking.registry import Registry
    from tuneflow.tracking.servers import check_mlflow

    logger = get_run_logger()
    cfg = TuneflowConfig.model_validate(config.model_dump())  # the Prefect UI cannot run model validators
    check_mlflow(tracking_uri(cfg.tracking.uri))  # refused credentials: one line naming the server
    registry = Registry(cfg)  # no name, no registry: stop here, before anything is downloaded
    fp = fingerprint_task(cfg)
    same = registry.trained_from(fp)
    if same is not None:
        decision = registry.skipped(same, fp)
    else:
        frozen = None if refreeze_eval_set else registry.frozen_rows()  # unreadable: stop before training
        summary = finetune(cfg, train_deployment=train_deployment)
        decision = decide_task(cfg, summary, fp, frozen)
    logger.info("retrain %s: %s (version %s, champion %s): %s", decision.model_name, decision.decision,
                decision.version, decision.champion, decision.reason)
    create_markdown_artifact(key="tuneflow-decision", markdown=decision.markdown(),
                             description=f"Retrain decision for {decision.model_name}")
    return decision.as_dict()
