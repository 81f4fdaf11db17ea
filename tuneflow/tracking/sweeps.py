"""A sweep's Optuna study and its MLflow parent run (`flows/sweep.py` runs the trials).

The study lives in a database (sweep.storage; by default sqlite next to the MLflow store), so a sweep that stops
midway resumes the same study: finished trials stay, a trial cut off while it ran is marked failed and its
parameters are tried again. The MLflow parent run (tag tuneflow.sweep.study) holds the space, the sampler, the best
trial and Optuna's plots; every trial's pipeline run is nested under it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

from tuneflow.core.config import TuneflowConfig, tracking_uri
from tuneflow.core.errors import TuneflowError
from tuneflow.core.evaluation import JUDGE_DIRECTIONS, METRIC_DIRECTIONS
from tuneflow.core.files import cache_root
from tuneflow.core.results import STOP_TAG
from tuneflow.core.sweep import Range
from tuneflow.tracking.runs import experiment_id, log_params

STUDY_TAG = "tuneflow.sweep.study"
TRIAL_STATE_TAG = "tuneflow.trial.state"  # of a trial's pipeline run once it ended: complete, pruned or fail
STORAGE_TAG = "tuneflow.sweep.storage"  # where the study is kept (without a password)
RESULT = "sweep.json"  # the sweep's result (as `tuneflow sweep` prints it), an artifact of its run


INTERRUPTED = "interrupted"  # user attribute of a trial cut off while it ran (its parameters are tried again)


class SweepProblem(TuneflowError):
    """A sweep that cannot go on as configured, worded for the user."""


def metric_of(cfg: TuneflowConfig) -> tuple[str, bool]:
    """The metric trials are ranked by, and whether greater is better."""
    s = cfg.sweep
    metric = s.metric or cfg.registry.metric
    if s.greater_is_better is not None:
        return metric, s.greater_is_better
    if not s.metric:
        return metric, cfg.registry.maximize
    return metric, {**METRIC_DIRECTIONS, **JUDGE_DIRECTIONS}.get(metric, True)  # benchmarks' accuracies: greater


def storage_url(cfg: TuneflowConfig) -> str:
    """sweep.storage, else sqlite in the folder of the MLflow sqlite store, else (a tracking server) in this machine's
    tuneflow cache: a sweep resumed on the same machine finds its study (a worker runs each flow run in a folder of
    its own, so output_dir would not do)."""
    if cfg.sweep.storage:
        return cfg.sweep.storage
    uri = tracking_uri(cfg.tracking.uri)
    if uri.startswith("sqlite:///"):
        folder, name = Path(uri.removeprefix("sqlite:///")).parent, "optuna.db"
    else:  # one file per tracking server: the same study name on two servers is two studies
        folder, name = cache_root() / "sweeps", f"optuna-{hashlib.sha256(uri.encode()).hexdigest()[:12]}.db"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / name}"


def shown_storage(url: str) -> str:
    """A storage URL as MLflow may keep it: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: keep only what follows the credentials
        return url.rsplit("@", 1)[-1]


def distributions(cfg: TuneflowConfig) -> dict:
    """Optuna's distribution of every key of sweep.space."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, dim in cfg.sweep.space.items():
        if isinstance(dim, Range):
            out[key] = (IntDistribution(dim.low, dim.high, log=dim.log, step=dim.step or 1) if dim.integer
                        else FloatDistribution(float(dim.low), float(dim.high), log=dim.log, step=dim.step))
        else:
            out[key] = CategoricalDistribution(dim)
    return out


def sampler_of(cfg: TuneflowConfig, seed: int):
    import optuna

    s = cfg.sweep
    if s.sampler == "grid":
        space = {k: (list(d) if isinstance(d, list) else d.grid()) for k, d in s.space.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def plain_space(cfg: TuneflowConfig) -> dict:
    """sweep.space as plain data: choices, or a range's low, high, log and step."""
    return {k: v if isinstance(v, list) else v.model_dump() for k, v in cfg.sweep.space.items()}


def what_is_searched(cfg: TuneflowConfig) -> str:
    """The search a study was made for: its space, metric and direction (a resumed study must match)."""
    metric, maximize = metric_of(cfg)
    return json.dumps({"space": plain_space(cfg), "metric": metric, "maximize": maximize,
                       "sampler": cfg.sweep.sampler}, sort_keys=True)


def open_study(cfg: TuneflowConfig, logger: logging.Logger):
    """The study of sweep.study_name (run_name) in the storage, created or resumed; a trial that was running when
    an earlier sweep stopped is marked failed (interrupted) and its parameters are queued to run again. A resumed
    study's sampler is seeded anew (sweep.seed + the trials it has), so that it does not propose its first points
    again; a study made for another search is refused."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = cfg.sweep
    sampler = sampler_of(cfg, s.seed)
    if s.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2)
    elif s.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=cfg.train.eval_steps,
                                                max_resource=cfg.train.max_steps if cfg.train.max_steps > 0 else "auto")
    else:
        pruner = optuna.pruners.NopPruner()
    _, maximize = metric_of(cfg)
    name = s.study_name or cfg.run_name
    study = optuna.create_study(storage=storage_url(cfg), sampler=sampler, pruner=pruner, study_name=name,
                                load_if_exists=True, direction="maximize" if maximize else "minimize")
    searched = study.user_attrs.get("tuneflow.search")
    if searched is None:
        study.set_user_attr("tuneflow.search", what_is_searched(cfg))
    elif searched != what_is_searched(cfg):
        raise SweepProblem(f"sweep.study_name: the study {name} in {storage_url(cfg)} was made for another search "
                           f"(space, metric or sampler: {searched[:300]}); set sweep.study_name to start a new one")
    if study.trials and s.sampler != "grid":
        study.sampler = sampler_of(cfg, s.seed + len(study.trials))
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        logger.info("sweep: trial %d was cut off when the sweep stopped; its parameters run again", trial.number)
    return study


def counted(study) -> list:
    """The trials that count towards sweep.trials: finished, pruned or failed, but not cut off."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED))]


def sweep_run(cfg: TuneflowConfig, client, name: str) -> str:
    """The sweep's MLflow parent run: the one of this study name in the experiment (resumed), else a new one. A run
    whose study is kept in another storage (a sweep resumed on another machine, each keeping its own) is refused."""
    exp = experiment_id(client, cfg.tracking.experiment)
    storage = shown_storage(storage_url(cfg))
    found = client.search_runs([exp], filter_string=f"tags.`{STUDY_TAG}` = '{name}'", max_results=1)
    if found:
        kept = found[0].data.tags.get(STORAGE_TAG)
        if kept and kept != storage:
            raise SweepProblem(f"the sweep of study {name} keeps its study in {kept}, but this machine's is {storage} "
                               "(by default each machine keeps its own): set sweep.storage to a database every cpu "
                               "worker reaches, or sweep.study_name to start a new study")
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    metric, maximize = metric_of(cfg)
    run_id = client.create_run(exp, run_name=f"sweep-{name}", tags={
        STUDY_TAG: name, STORAGE_TAG: storage, "tuneflow.kind": "sweep"}).info.run_id
    log_params(client, run_id, {"sweep.sampler": cfg.sweep.sampler, "sweep.seed": cfg.sweep.seed,
                                "sweep.trials": cfg.sweep.trials, "sweep.metric": metric,
                                "sweep.direction": "maximize" if maximize else "minimize",
                                "sweep.space": json.dumps(plain_space(cfg), sort_keys=True)})
    return run_id


def close_interrupted(client, experiment_id: str, sweep_run_id: str, study) -> None:
    """The MLflow runs of trials cut off when an earlier sweep stopped: tagged interrupted and ended (KILLED), not
    left running."""
    for trial in study.get_trials(deepcopy=False):
        if not trial.user_attrs.get(INTERRUPTED):
            continue
        run_id = trial_run(client, experiment_id, sweep_run_id, trial.number)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, TRIAL_STATE_TAG, INTERRUPTED)
            client.set_terminated(run_id, "KILLED")


def tell(study, trial, *args, **kwargs) -> bool:
    """study.tell; True when the grid sampler has now visited every point: Optuna's GridSampler then calls
    study.stop(), which only study.optimize can take (the trial is stored all the same)."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise
        return True
    return False


def trial_run(client, experiment_id: str, sweep_run_id: str, number: int) -> str | None:
    """The MLflow run of trial ``number``'s pipeline, nested under the sweep's run."""
    found = client.search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`tuneflow.sweep` = '{sweep_run_id}' and tags.`tuneflow.trial` = '{number}'"))
    return found[0].info.run_id if found else None


def trial_record(trial) -> dict:
    state = INTERRUPTED if trial.user_attrs.get(INTERRUPTED) else trial.state.name.lower()  # complete, fail, ...
    record = {"number": trial.number, "state": state, "value": trial.value,
              "params": trial.params, "mlflow_run_id": trial.user_attrs.get("mlflow_run_id")}
    if "error" in trial.user_attrs:  # why it failed
        record["error"] = trial.user_attrs["error"]
    return record


def log_plots(client, run_id: str, study, logger: logging.Logger) -> None:
    """Optuna's optimisation history and parameter importances as images of the sweep run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    for name, draw in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances)):
        try:
            axes = draw(study)
        except (ValueError, RuntimeError) as exc:  # importances need two finished trials that differ
            logger.info("sweep: no %s plot (%s)", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        client.log_figure(run_id, figure, f"optuna/{name}.png")
        plt.close(figure)


class PruneWatch(threading.Thread):
    """While a trial's pipeline runs: the held-out loss its training logs at every evaluation (train.eval_steps) goes
    to Optuna's pruner (negated when the study maximises its metric, so that better is the study's way); when the
    pruner says the trial is hopeless, the train run is tagged to stop (tuneflow.stop) and its training ends at its
    next evaluation, checkpoints kept."""

    def __init__(self, client, experiment_id: str, sweep_run_id: str, trial, maximize: bool, logger,
                 every_s: float = 0.5):
        super().__init__(daemon=True, name=f"prune-watch-{trial.number}")
        self.client, self.experiment_id, self.sweep_run_id, self.trial = client, experiment_id, sweep_run_id, trial
        self.maximize, self.logger, self.every_s = maximize, logger, every_s
        self.done, self.reported, self.pruned_at, self.said = threading.Event(), -1, None, set()

    def train_run(self) -> str | None:
        pipeline = trial_run(self.client, self.experiment_id, self.sweep_run_id, self.trial.number)
        if not pipeline:
            return None
        train = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.mlflow.parentRunId = '{pipeline}' and tags.mlflow.runName = 'train'"))
        return train[0].info.run_id if train else None

    def run(self) -> None:
        train = None
        while not self.done.wait(self.every_s):
            try:
                train = train or self.train_run()
                if train is None:
                    continue
                for m in sorted(self.client.get_metric_history(train, "eval_loss"), key=lambda m: m.step):
                    if m.step <= self.reported:
                        continue
                    self.trial.report(-m.value if self.maximize else m.value, m.step)
                    self.reported = m.step
                    if self.trial.should_prune():
                        self.client.set_tag(train, STOP_TAG, f"pruned by the sweep at step {m.step}")
                        self.pruned_at = m.step
                        self.logger.info("sweep: trial %d pruned at step %d (eval_loss %.4g)", self.trial.number,
                                         m.step, m.value)
                        return
            except Exception as exc:  # the tracking server busy a moment: the next poll tries again
                said = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if said not in self.said:  # once each: a lasting one means no pruning for this trial
                    self.said.add(said)
                    self.logger.warning("sweep: trial %d: reading its held-out loss failed (%s)", self.trial.number,
                                        said)

    def stop(self) -> None:
        self.done.set()
        self.join()
