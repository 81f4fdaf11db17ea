"""`tuneflow worker --pool cpu`: check the Prefect and MLflow credentials, then become `prefect worker start`."""

from __future__ import annotations

import argparse
import os
import sys

from tuneflow.tracking.servers import check_servers


def cmd_worker(args: argparse.Namespace) -> int:
    """`tuneflow worker --pool X [--name N] [--run-once] [--limit K]`: check both servers, then exec
    `prefect worker start` with the same options."""
    check_servers()  # ServerRefused: one line, exit status 2 (tuneflow.cli.main)
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    argv = [prefect, "worker", "start", "--pool", args.pool]
    argv += ["--name", args.name] if args.name else []
    argv += ["--limit", str(args.limit)] if args.limit else []
    argv += ["--run-once"] if args.run_once else []
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(prefect, argv)
    return 0  # not reached


def add_worker_command(sub) -> None:
    """Register `tuneflow worker` on the CLI's subparsers."""
    p = sub.add_parser(
        "worker", help="check the Prefect and MLflow credentials, then start a Prefect worker for a pool",
        description="Checks that PREFECT_API_URL and MLFLOW_TRACKING_URI accept this environment's credentials "
                    "(one line naming the server that refused, and exit code 2, if not), then runs "
                    "`prefect worker start --pool POOL` with the options below.")
    p.add_argument("--pool", required=True, help="work pool to serve: cpu or gpu (make deploy creates both)")
    p.add_argument("--name", help="the worker's name in the Prefect UI (default: Prefect's)")
    p.add_argument("--limit", type=int, help="at most this many flow runs at once on this worker")
    p.add_argument("--run-once", action="store_true", help="take the runs that are due, then exit")
    p.set_defaults(fn=cmd_worker)
