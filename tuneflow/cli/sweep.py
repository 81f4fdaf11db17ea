"""`tuneflow sweep`: a hyperparameter search, trials of the pipeline proposed by Optuna (flows/sweep.py).

    tuneflow sweep --config configs/demo.yaml --space configs/spaces/demo.yaml [--trials N] [--parallel P]
    tuneflow sweep --config ... --space ... --submit [--wait]    # on the team's Prefect server (PREFECT_API_URL)

The last stdout line is the result as JSON: {"sweep": <MLflow run id>, "best_trial", "best_value", "best_params",
"trials": [{"number", "state", "value", "params", "mlflow_run_id"}, ...]}.
"""

from __future__ import annotations

import sys

from tuneflow.cli.common import add_config_arguments, check_trains_here, load, print_json_result
from tuneflow.cli.remote import SWEEP_DEPLOYMENT, TRAIN_DEPLOYMENT, submit
from tuneflow.core.errors import TuneflowError
from tuneflow.core.loading import ConfigError, with_values


def read_space(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            space = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--space: no such file: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--space {path}: not valid YAML: {exc}") from None
    if not isinstance(space, dict):
        raise ConfigError(f"--space {path}: expected a mapping of config keys to [choices] or {{low, high, log, "
                          "step}")
    return space


def cmd_sweep(args) -> int:
    from tuneflow.core.sweep import check_space

    cfg = load(args)
    values = {**({"sweep.space": read_space(args.space)} if args.space else {}),
              **({"sweep.trials": args.trials} if args.trials is not None else {}),
              **({"sweep.parallel": args.parallel} if args.parallel is not None else {})}
    if values:
        cfg = with_values(cfg, values, "--space")
    problems = check_space(cfg)  # each key's values, before the first trial starts
    if problems:
        raise ConfigError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the sweep's space:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    if args.submit:
        return submit_sweep(cfg, args)
    check_trains_here(cfg)  # trials train on this machine
    if cfg.sweep.parallel > 1:
        import torch

        if torch.cuda.is_available():
            raise TuneflowError(f"sweep.parallel {cfg.sweep.parallel} on this machine: each trial's training would "
                                "take every GPU here at once; run the trials one at a time, or --submit them to the "
                                "gpu pool, where each training run gets a GPU worker of its own")
    from flows.sweep import sweep
    from tuneflow.tracking.registry import Registry, RegistryProblem
    from tuneflow.tracking.sweeps import SweepProblem

    if args.register:  # no registry name, no export, a store without a registry: one line, before any trial
        Registry(cfg)
    return print_json_result("sweep", lambda: sweep(cfg, register_best=args.register),
                             passes=(RegistryProblem, SweepProblem))


def submit_sweep(cfg, args) -> int:
    """The sweep as a flow run of tuneflow-sweep/on-demand on the team's server; with --wait, each trial's state and
    value and the best so far as they change, then the result as JSON."""
    return submit(cfg, args, "tuneflow sweep", follow, register_best=args.register)


def follow(flow_run_id, cfg) -> int:
    """Print the sweep's state and each trial's (from the sweep's MLflow run) as they change; then its result."""
    import json
    import time
    from pathlib import Path

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from tuneflow.core.config import tracking_uri
    from tuneflow.core.progress import StateLog
    from tuneflow.tracking.runs import experiment_id
    from tuneflow.tracking.sweeps import RESULT, TRIAL_STATE_TAG, metric_of

    uri = tracking_uri(cfg.tracking.uri)
    if not uri.startswith(("http://", "https://")):
        raise TuneflowError("--wait follows the sweep in MLflow: set MLFLOW_TRACKING_URI to the workers' tracking "
                            "server")
    mlflow, (metric, maximize) = MlflowClient(uri), metric_of(cfg)
    log = StateLog(lambda text: print(f"{time.strftime('%H:%M:%S')} {text}", flush=True))
    sweep_id, best = None, None
    with get_client(sync_client=True) as prefect:
        while True:
            run = prefect.read_flow_run(flow_run_id)
            log.note("sweep", f"sweep: {run.state.name}")
            experiment = experiment_id(mlflow, cfg.tracking.experiment)
            if sweep_id is None:
                found = mlflow.search_runs([experiment], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
                sweep_id = found[0].info.run_id if found else None
            trials = mlflow.search_runs([experiment], f"tags.`tuneflow.sweep` = '{sweep_id}'") if sweep_id else []
            for t in sorted(trials, key=lambda t: int(t.data.tags["tuneflow.trial"])):
                number, state = int(t.data.tags["tuneflow.trial"]), t.data.tags.get(TRIAL_STATE_TAG)
                value = t.data.metrics.get(metric) if state == "complete" else None
                if value is not None and (best is None or (value > best[1] if maximize else value < best[1])):
                    best = (number, value)
                log.note(number, f"  trial {number}: {state or t.info.status.lower()}"
                         + (f", {metric} {value:.4g}" if value is not None else ""))
            if best:
                log.note("best", f"  best so far: trial {best[0]}, {metric} {best[1]:.4g}")
            if run.state.is_final():
                break
            time.sleep(2)
    if not run.state.is_completed() or sweep_id is None:
        print(f"tuneflow: sweep flow run {run.name} {run.state.name}: {run.state.message or 'no message'}",
              file=sys.stderr)
        return 1
    result = json.loads(Path(mlflow.download_artifacts(sweep_id, RESULT)).read_text())
    print(json.dumps(result), flush=True)
    return 0


def add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="search config keys with Optuna: trials of the pipeline, nested under one MLflow "
                       "run; prints the result as JSON on the last line")
    add_config_arguments(p)
    p.add_argument("--space", help="YAML file: {dotted.key: [choices] | {low, high, log, step}} (else sweep.space)")
    p.add_argument("--trials", type=int, help="trials in the study (else sweep.trials)")
    p.add_argument("--parallel", type=int, metavar="P", help="trials at once (else sweep.parallel, 1)")
    p.add_argument("--register", action="store_true", help="register the best trial's export as a version of "
                   "registry.model_name and promote it if it beats the champion, as tuneflow retrain does")
    p.add_argument("--submit", action="store_true", help="run the sweep on the team's Prefect server "
                   "(PREFECT_API_URL): a flow run of tuneflow-sweep/on-demand, trials training on --train-deployment")
    p.add_argument("--deployment", default=SWEEP_DEPLOYMENT,
                   help="with --submit: the sweep deployment (default: %(default)s)")
    p.add_argument("--train-deployment", default=TRAIN_DEPLOYMENT,
                   help="with --submit: where trials train (default: %(default)s); '' trains on the sweep's worker")
    p.add_argument("--wait", action="store_true", help="with --submit: follow the trials until the sweep ends, then "
                   "print its result as JSON; exit 1 if it fails")
    p.set_defaults(fn=cmd_sweep)
