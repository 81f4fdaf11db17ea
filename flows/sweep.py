"""A hyperparameter search as one Prefect flow: trials of the pipeline over sweep.space, proposed by Optuna.

    tuneflow sweep --config configs/demo.yaml --space configs/spaces/demo.yaml   # on this machine (docs/sweeps.md)

Each trial is the whole pipeline (`tuneflow-finetune` as a subflow) with the trial's values set, scored by the held-out
metric evaluate logs (sweep.metric, else registry.metric), on the same evaluation rows for every trial. Its MLflow run
is nested under the sweep's parent run (tags tuneflow.sweep, tuneflow.trial), so MLflow's runs table, Compare and
parallel coordinates work over the trials. A trial that fails is recorded as failed and the sweep goes on. The study
is kept in a database (tuneflow/tracking/sweeps.py): run again, a sweep that stopped resumes where it was.
"""

from __future__ import annotations

import contextlib
import math

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.finetune import finetune
from tuneflow.core.config import TuneflowConfig, tracking_uri
from tuneflow.core.loading import ConfigError, with_values
from tuneflow.core.sweep import check_space
from tuneflow.tracking.runs import log_metrics, run_url
from tuneflow.tracking.servers import check_mlflow
from tuneflow.tracking.sweeps import (
    RESULT,
    TRIAL_STATE_TAG,
    PruneWatch,
    close_interrupted,
    counted,
    distributions,
    log_plots,
    metric_of,
    open_study,
    sweep_run,
    tell,
    trial_record,
    trial_run,
)


@flow(name="tuneflow-sweep")
def sweep(config: TuneflowConfig, train_deployment: str | None = None, register_best: bool = False) -> dict:
    """Search sweep.space: sweep.trials runs of the pipeline, each with the values Optuna proposes; returns the best
    trial and every trial's state, value, values and MLflow run.

    Args:
        config: The pipeline config with a sweep section (its space, trials, sampler, seed, metric, storage).
        train_deployment: Run each trial's training as a flow run of this deployment, e.g. tuneflow-train/gpu on the
            gpu work pool. Empty: train on the machine that runs this flow.
        register_best: Register the best trial's export as a version of registry.model_name and decide it against the
            champion on the frozen evaluation set, as `tuneflow retrain` does.
    """
    from mlflow import MlflowClient

    logger = get_run_logger()
    cfg = TuneflowConfig.model_validate(config.model_dump())  # the Prefect UI cannot run model validators
    problems = check_space(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    uri = tracking_uri(cfg.tracking.uri)
    check_mlflow(uri)
    client = MlflowClient(uri)
    frozen = None
    if register_best:  # no registry name, no export, a frozen set that cannot be read: stop before any trial
        from tuneflow.tracking.registry import Registry

        frozen = Registry(cfg).frozen_rows()
    metric, maximize = metric_of(cfg)
    study = open_study(cfg, logger)
    run_id = sweep_run(cfg, client, study.study_name)
    client.set_tag(run_id, "prefect.flow_run_id", str(flow_run.id))  # this flow run's (a resumed study: the latest)
    close_interrupted(client, client.get_run(run_id).info.experiment_id, run_id, study)
    logger.info("sweep: study %s, %d of %d trials done; %s %s by %s sampling", study.study_name,
                len(counted(study)), cfg.sweep.trials, "maximising" if maximize else "minimising", metric,
                cfg.sweep.sampler)
    try:
        run_trials(cfg, client, study, run_id, metric, maximize, train_deployment, logger)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    result = finish(client, uri, run_id, study, metric, logger)
    if register_best:
        result["decision"] = decide_best(cfg, client, result, frozen, logger)
    client.log_dict(run_id, result, RESULT)  # what `tuneflow sweep --submit --wait` prints
    return result


def decide_best(cfg: TuneflowConfig, client, result: dict, frozen: list[dict] | None, logger) -> dict:
    """The best trial's export through the gate of `tuneflow retrain`: registered as a version of
    registry.model_name and promoted only if it beats the champion on the frozen set and keeps every guard (skipped
    when a version was trained from exactly its sources and config)."""
    import json
    from pathlib import Path

    from flows.retrain import decide_task, fingerprint_task
    from tuneflow.tracking.registry import Registry

    if result["best_trial"] is None:
        raise RuntimeError("no trial finished: nothing to register")
    best = next(t for t in result["trials"] if t["number"] == result["best_trial"])
    best_cfg = trial_config(cfg, best["params"], best["number"])
    fp = fingerprint_task(best_cfg)
    registry = Registry(best_cfg)
    same = registry.trained_from(fp)
    if same is not None:
        decision = registry.skipped(same, fp)
    else:
        summary = json.loads(Path(client.download_artifacts(best["mlflow_run_id"], "summary.json")).read_text())
        decision = decide_task(best_cfg, summary, fp, frozen)
    logger.info("sweep: trial %d for %s: %s (version %s, champion %s): %s", best["number"], decision.model_name,
                decision.decision, decision.version, decision.champion, decision.reason)
    return decision.as_dict()


def trial_config(cfg: TuneflowConfig, values: dict, number: int) -> TuneflowConfig:
    """The pipeline config of trial ``number``: the sweep's with the trial's values (a ConfigError when they do not
    go together, which checking each key alone cannot see: an optimizer and a ZeRO preset)."""
    return with_values(cfg, {**values, "run_name": f"{cfg.run_name}-trial-{number}"}, "sweep.space")


@task(name="trial", cache_policy=NO_CACHE)
def run_trial(cfg: TuneflowConfig, train_deployment: str | None, tags: dict[str, str]) -> tuple[dict, str | None]:
    """One trial: the pipeline as a subflow; its summary, or why it failed."""
    state = finetune(cfg, train_deployment, mlflow_tags=tags, return_state=True)
    return (state.result(), None) if state.is_completed() else ({}, str(state.message))


def die_with_parent() -> None:
    """In a trial's process: SIGTERM when the sweep's process dies (Linux), so that no trial goes on unwatched (its
    pipeline then cancels its training run)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TrialProcess:
    """One trial's pipeline in a process of its own (Prefect's process pool of one, the task `trial-<n>`): two
    pipelines in one process would share torch's global state (the default dtype transformers sets while it loads a
    model), and a trial whose process is lost (out of memory) fails alone."""

    def __init__(self, trial_cfg: TuneflowConfig, train_deployment: str | None, tags: dict[str, str], number: int):
        from prefect.task_runners import ProcessPoolTaskRunner

        self.runner = ProcessPoolTaskRunner(max_workers=1, initializer=die_with_parent).__enter__()
        self.future = self.runner.submit(run_trial.with_options(task_run_name=f"trial-{number}"), {
            "cfg": trial_cfg, "train_deployment": train_deployment, "tags": tags})

    def outcome(self) -> tuple[dict, str | None]:
        """The trial's summary and error (its process lost: no summary, the error says so)."""
        try:
            return self.future.result()
        except Exception as exc:
            return {}, f"the trial's process was lost: {type(exc).__name__}: {exc}"
        finally:
            self.runner.__exit__(None, None, None)

    def stop(self) -> None:
        """The sweep itself stops: end the trial now rather than wait for it (its process gets SIGTERM)."""
        executor = self.runner._executor  # the stdlib ProcessPoolExecutor: Prefect's shutdown would wait
        for process in list(getattr(executor, "_processes", {}).values()):
            process.terminate()
        self.runner.__exit__(None, None, None)


@contextlib.contextmanager
def shared_api():
    """Trials' processes talk to this process's Prefect API: without PREFECT_API_URL, the temporary server this
    process started (else each would start one of its own on the same database)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process runs (started with the flow run)
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def run_trials(cfg: TuneflowConfig, client, study, run_id: str, metric: str, maximize: bool,
               train_deployment: str | None, logger) -> None:
    """Trials until the study has sweep.trials (or the grid is done), sweep.parallel of them at once, each recorded
    complete, pruned or failed as it ends."""
    from optuna.trial import TrialState

    def fail(trial, why: str) -> bool:
        trial.set_user_attr("error", why[:1000])
        logger.warning("sweep: trial %d failed: %s", trial.number, why)
        return tell(study, trial, state=TrialState.FAIL)

    space = distributions(cfg)
    experiment = client.get_run(run_id).info.experiment_id
    wanted = min(cfg.sweep.trials, grid_size(cfg)) if cfg.sweep.sampler == "grid" else cfg.sweep.trials
    running: dict = {}  # its future -> (trial, its config, its pruning watch, its process)
    exhausted = False
    try:
        with shared_api():
            while True:
                while not exhausted and len(running) < cfg.sweep.parallel and \
                        len(counted(study)) + len(running) < wanted:
                    trial = study.ask(space)
                    values = {key: trial.params[key] for key in space}
                    logger.info("sweep: trial %d: %s", trial.number, ", ".join(
                        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
                    try:
                        trial_cfg = trial_config(cfg, values, trial.number)
                    except ConfigError as exc:
                        exhausted = fail(trial, f"these values do not go together:\n{exc}")
                        continue
                    tags = {"mlflow.parentRunId": run_id, "tuneflow.sweep": run_id,
                            "tuneflow.trial": str(trial.number)}
                    watch = PruneWatch(client, experiment, run_id, trial, maximize, logger) \
                        if cfg.sweep.pruner != "none" else None
                    if watch:
                        watch.start()
                    process = TrialProcess(trial_cfg, train_deployment, tags, trial.number)
                    running[process.future] = (trial, trial_cfg, watch, process)
                if not running:
                    break
                future = next(as_completed(list(running)))
                trial, trial_cfg, watch, process = running.pop(future)
                if watch:
                    watch.stop()
                summary, error = process.outcome()
                exhausted = record(study, client, experiment, run_id, trial, trial_cfg, summary, error, metric,
                                   fail, logger) or exhausted
    except BaseException:  # the sweep stops (an error, cancelled): so do its trials; run again, they run again
        for _, _, watch, process in running.values():
            if watch:
                watch.stop()
            process.stop()
        raise
    if exhausted:
        logger.info("sweep: every point of the grid is tried")


def record(study, client, experiment: str, run_id: str, trial, trial_cfg: TuneflowConfig, summary: dict,
           error: str | None, metric: str, fail, logger) -> bool:
    """A trial's outcome in the study (complete, pruned or failed) and on the sweep run; True when the grid is
    done."""
    from optuna.trial import TrialState

    pipeline_run = trial_run(client, experiment, run_id, trial.number)
    if pipeline_run:
        trial.set_user_attr("mlflow_run_id", pipeline_run)

    def outcome(state: str) -> None:  # on the trial's run too: MLflow's runs table filters by it
        if pipeline_run:
            client.set_tag(pipeline_run, TRIAL_STATE_TAG, state)

    value = summary.get("metrics", {}).get(metric)
    if summary.get("status") == "stopped":  # pruned: its training stopped at an evaluation
        train = summary["stages"]["train"]
        saved = saved_gpu_seconds(trial_cfg, train)
        trial.set_user_attr("saved_gpu_seconds", saved)
        logger.info("sweep: trial %d pruned after step %d, about %.0f GPU-seconds saved", trial.number,
                    train["global_step"], saved)
        outcome("pruned")
        return tell(study, trial, state=TrialState.PRUNED)
    if value is None or not math.isfinite(value):  # failed, or diverged
        outcome("fail")
        return fail(trial, error if error is not None else f"evaluate logged no {metric}" if value is None else
                    f"{metric} is {value}: training diverged")
    outcome("complete")
    exhausted = tell(study, trial, value)
    log_metrics(client, run_id, {f"trial.{metric}": value}, step=trial.number)
    best = study.best_trial  # this one at least is complete
    logger.info("sweep: trial %d: %s %.4g; best so far trial %d, %.4g", trial.number, metric, value, best.number,
                best.value)
    return exhausted


def grid_size(cfg: TuneflowConfig) -> int:
    """The points of the grid sampler's grid (every choice of every key, every step of every range)."""
    return math.prod(len(d) if isinstance(d, list) else len(d.grid()) for d in cfg.sweep.space.values())


def saved_gpu_seconds(cfg: TuneflowConfig, train: dict) -> float:
    """What stopping a trial's training saved: the steps it did not train, at the pace of those it did, on each of
    its processes (0 when train.max_steps is unset: the full length is then not known up front)."""
    steps = train["global_step"]
    if cfg.train.max_steps <= 0 or not steps:
        return 0.0
    return train["seconds"] / steps * max(cfg.train.max_steps - steps, 0) * train["world_size"]


def finish(client, uri: str, run_id: str, study, metric: str, logger) -> dict:
    """The sweep run's best trial, plots and status; the result as `tuneflow sweep` prints it."""
    from optuna.trial import TrialState

    trials = [trial_record(t) for t in study.get_trials(deepcopy=False)]
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    result = {"sweep": run_id, "study": study.study_name, "metric": metric, "best_trial": None, "best_value": None,
              "best_params": {}, "trials": trials}
    if done:
        best = study.best_trial
        result.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        for key, value in best.params.items():  # tags: a longer sweep of the same study may find another best
            client.set_tag(run_id, f"best.{key}", str(value))
        log_metrics(client, run_id, {f"best.{metric}": best.value, "trials.complete": len(done),
                                     "trials.failed": sum(t["state"] == "fail" for t in trials),
                                     "trials.pruned": sum(t["state"] == "pruned" for t in trials),
                                     "pruning.saved_gpu_seconds": sum(t.user_attrs.get("saved_gpu_seconds", 0)
                                                                      for t in study.get_trials(deepcopy=False))})
        best_run = best.user_attrs.get("mlflow_run_id")
        if best_run:
            client.set_tag(run_id, "tuneflow.best_run", best_run)
            run = client.get_run(best_run)
            client.set_tag(run_id, "tuneflow.best_run_url", run_url(uri, run.info.experiment_id, best_run))
        logger.info("sweep: best trial %d, %s %.4g: %s", best.number, metric, best.value, best.params)
    log_plots(client, run_id, study, logger)
    client.set_terminated(run_id, "FINISHED" if done else "FAILED")
    return result
