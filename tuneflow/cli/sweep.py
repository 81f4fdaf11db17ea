"""`tuneflow sweep`: a hyperparameter search, trials of the pipeline proposed by Optuna (flows/sweep.py).

    tuneflow sweep --config configs/demo.yaml --space configs/spaces/demo.yaml [--trials N]

The last stdout line is the result as JSON: {"sweep": <MLflow run id>, "best_trial", "best_value", "best_params",
"trials": [{"number", "state", "value", "params", "mlflow_run_id"}, ...]}.
"""

from __future__ import annotations

from tuneflow.cli.common import add_config_arguments, check_trains_here, load, print_json_result
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
              **({"sweep.trials": args.trials} if args.trials is not None else {})}
    if values:
        cfg = with_values(cfg, values, "--space")
    problems = check_space(cfg)  # each key's values, before the first trial starts
    if problems:
        raise ConfigError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the sweep's space:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    check_trains_here(cfg)  # trials train on this machine
    from flows.sweep import sweep
    from tuneflow.tracking.registry import Registry, RegistryProblem
    from tuneflow.tracking.sweeps import SweepProblem

    if args.register:  # no registry name, no export, a store without a registry: one line, before any trial
        Registry(cfg)
    return print_json_result("sweep", lambda: sweep(cfg, register_best=args.register),
                             passes=(RegistryProblem, SweepProblem))


def add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="search config keys with Optuna: trials of the pipeline, nested under one MLflow "
                       "run; prints the result as JSON on the last line")
    add_config_arguments(p)
    p.add_argument("--space", help="YAML file: {dotted.key: [choices] | {low, high, log, step}} (else sweep.space)")
    p.add_argument("--trials", type=int, help="trials in the study (else sweep.trials)")
    p.add_argument("--register", action="store_true", help="register the best trial's export as a version of "
                   "registry.model_name and promote it if it beats the champion, as tuneflow retrain does")
    p.set_defaults(fn=cmd_sweep)
