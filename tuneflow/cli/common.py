"""What `tuneflow`'s subcommands share: the --config/--set arguments and the config they load."""

from __future__ import annotations

import argparse
import sys

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
