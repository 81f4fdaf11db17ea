"""What `tuneflow`'s subcommands share: the --config/--set arguments and the config they load."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from tuneflow.core.config import TuneflowConfig
from tuneflow.core.loading import load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.learning_rate=1e-4 (repeatable)")


def load(args: argparse.Namespace) -> TuneflowConfig:
    """The config of --config and --set; a ConfigError lists every problem (tuneflow.cli.main says it)."""
    cfg = load_config(args.config, args.set)
    for ignored in cfg.ignored_settings():
        print(f"tuneflow: warning: {ignored}", file=sys.stderr)
    return cfg


def check_trains_here(cfg: TuneflowConfig) -> None:
    """What stops training on this machine (several nodes, an optimizer it cannot run) and a server that refuses our
    credentials: one line each, before any work."""
    from tuneflow.core.errors import TuneflowError
    from tuneflow.modeling.precision import machine_problem
    from tuneflow.placement.pool import placement_problem
    from tuneflow.tracking.servers import check_servers

    problem = placement_problem(cfg, None) or machine_problem(cfg)
    if problem:
        raise TuneflowError(problem)
    check_servers(cfg.tracking.uri)


def print_json_result(what: str, fn: Callable[[], dict], passes: tuple[type[Exception], ...] = ()) -> int:
    """Run a flow; print its result as JSON on the last stdout line (exit 0), or that it failed (exit 1). Errors of
    ``passes`` go on to `tuneflow`'s own one-line report."""
    try:
        result = fn()
    except passes:
        raise
    except Exception as exc:
        print(f"tuneflow: {what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0
