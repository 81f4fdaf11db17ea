"""The local team stack, without Docker: PostgreSQL, a Prefect server and an MLflow server on it, both
authenticated, the deployments, and one process worker per pool, everything under one folder.

    make stack                 # tuneflow stack start   (again: starts only what is not running)
    source .stack/env          # PREFECT_API_URL, PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_URI, MLFLOW_TRACKING_*
    make stack-stop            # tuneflow stack stop    (stops exactly what `start` started)
    tuneflow stack status

Settings (environment): STACK_DIR (default .stack), STACK_HOST (what Prefect and MLflow bind, default 127.0.0.1),
STACK_PREFECT_PORT (default 4200), STACK_MLFLOW_PORT (default 5000), STACK_PG_PORT (default 5433; PostgreSQL only
ever listens on 127.0.0.1), STACK_POOLS (default "cpu gpu"), STACK_PG_BIN (default /usr/lib/postgresql/15/bin).
A default port that is taken is replaced by a free one; the ports chosen the first time are kept in
<STACK_DIR>/stack.json. The workers inherit the environment of `make stack` (HF_TOKEN, HF_ENDPOINT, HF_HUB_CACHE,
TUNEFLOW_CACHE, PREFECT_WORKER_QUERY_SECONDS, ...) plus the stack's URLs and credentials. docs/stack.md has the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from infra.local.layout import CLIENT_VARS, Layout, StackError, say
from infra.local.postgres import Postgres
from infra.local.processes import Processes
from infra.local.services import Services


class Stack:
    """`tuneflow stack start|stop|status` on the folder ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.layout = Layout(root)
        self.processes = Processes(self.layout)
        self.postgres = Postgres(self.layout)
        self.services = Services(self.layout, self.processes, self.postgres)

    def start(self) -> None:
        for d in (self.root, self.root / "pids", self.root / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(self.root, 0o711)  # the postgres user must pass through to its data folder; nothing to list
        state, creds = self.layout.load_state(), self.layout.load_secrets()
        client = self.layout.client_env(state, creds)
        self.layout.write_env_file(client)
        self.postgres.start(state, creds)
        self.services.start_prefect(state, creds)
        self.services.start_mlflow(state, creds)
        from tuneflow.tracking.servers import check_mlflow, check_prefect

        check_prefect(client["PREFECT_API_URL"], client["PREFECT_API_AUTH_STRING"])
        os.environ.update({k: v for k, v in client.items() if k.startswith("MLFLOW_")})
        check_mlflow(client["MLFLOW_TRACKING_URI"])
        self.services.deploy(client)
        for pool in os.environ.get("STACK_POOLS", "cpu gpu").split():
            self.services.start_worker(pool, client)
        self.report(state)

    def report(self, state: dict) -> None:
        urls, env_file = self.layout.urls(state), self.layout.env_file
        try:
            env_file = env_file.relative_to(Path.cwd())
        except ValueError:
            pass
        print(f"""
tuneflow stack is up (folder {self.root}):
  Prefect    {urls['prefect']}      UI and API ({urls['prefect']}/api), on PostgreSQL
  127.0.0.1:{state['ports']['pg']}/prefect
  MLflow     {urls['mlflow']}      tracking, model registry, proxied artifacts, on PostgreSQL .../mlflow
  workers    {', '.join(p for p in os.environ.get('STACK_POOLS', 'cpu gpu').split())}   (logs: {self.root / 'logs'})
Use it from a shell (the file exports {', '.join(CLIENT_VARS)}):
  source {env_file}
Sign in to the UIs with the user and password in that file (Prefect: the auth string user:password).
Stop it: make stack-stop""", flush=True)

    def stop(self) -> None:
        names = [p.stem for p in sorted((self.root / "pids").glob("worker-*.pid"))] + ["mlflow-server",
                                                                                       "prefect-server"]
        for name in names:
            if self.processes.stop_process(name):
                say(f"stopped {name}")
        if self.postgres.running():
            done = self.postgres.pg_ctl("stop", "-w", "-t", "60", "-m", "fast")
            if done.returncode != 0:
                raise StackError(f"pg_ctl stop failed: {done.stderr.strip()}")
            say("stopped PostgreSQL")
        say(f"stopped; data, credentials and logs stay in {self.root} (rm -rf it to start afresh)")

    def status(self) -> int:
        state = json.loads(self.layout.state_file.read_text()) if self.layout.state_file.is_file() else None
        if state is None:
            print(f"no stack in {self.root}")
            return 1
        up = {"postgres": self.postgres.running()}
        for pid in sorted((self.root / "pids").glob("*.pid")):
            up[pid.stem] = self.processes.running(pid.stem) is not None
        for name, ok in up.items():
            print(f"{name:15s} {'running' if ok else 'stopped'}")
        urls = self.layout.urls(state)
        print(f"Prefect {urls['prefect']}   MLflow {urls['mlflow']}   env: {self.layout.env_file}")
        return 0 if all(up.values()) else 3
