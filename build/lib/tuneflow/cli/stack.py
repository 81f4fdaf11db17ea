"""`tuneflow stack start|stop|status`: the local team stack without Docker (`make stack`, docs/stack.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tuneflow.core.errors import TuneflowError


def cmd_stack(args: argparse.Namespace) -> int:
    from infra.local.stack import Stack

    stack = Stack(Path(args.dir).absolute())
    if args.action == "status":
        return stack.status()
    try:
        stack.start() if args.action == "start" else stack.stop()
    except TuneflowError:
        if args.action == "start":
            print("tuneflow: what did start is still running; make stack-stop ends it", file=sys.stderr)
        raise
    return 0


def add_stack_command(sub) -> None:
    p = sub.add_parser("stack", help="the local team stack without Docker: PostgreSQL, Prefect and MLflow with "
                       "authentication, a worker per pool (make stack; docs/stack.md)")
    p.add_argument("action", choices=["start", "stop", "status"],
                   help="start: what is not running yet; stop: exactly what start started")
    p.add_argument("--dir", default=os.environ.get("STACK_DIR") or ".stack",
                   help="the stack's folder (default: $STACK_DIR or .stack); credentials: source <dir>/env")
    p.set_defaults(fn=cmd_stack)
