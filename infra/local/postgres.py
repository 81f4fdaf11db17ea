"""The stack's PostgreSQL: one cluster under <stack>/postgres, listening on 127.0.0.1 only, with a database and a
role each for Prefect and MLflow. As root it runs as the `postgres` user (initdb and postgres refuse root)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra.local.layout import Layout, StackError, say

PG_BIN = Path(os.environ.get("STACK_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass
class Postgres:
    layout: Layout

    def pg_user(self) -> str | None:
        """initdb and postgres refuse root: as root, PostgreSQL runs as the `postgres` user."""
        return "postgres" if os.geteuid() == 0 else None

    def as_pg(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        user = self.pg_user()
        full = (["runuser", "-u", user, "--"] if user else []) + cmd
        return subprocess.run(full, capture_output=True, text=True, **kw)

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.layout.pg_dir / "data"), *args])

    def running(self) -> bool:
        return (self.layout.pg_dir / "data" / "PG_VERSION").is_file() and self.pg_ctl("status").returncode == 0

    def start(self, state: dict, creds: dict) -> None:
        if not (PG_BIN / "initdb").is_file():
            raise StackError(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb is missing): "
                             "apt-get install postgresql-15, or set STACK_PG_BIN to its bin folder")
        data, run = self.layout.pg_dir / "data", self.layout.pg_dir / "run"
        user = self.pg_user()
        if not (data / "PG_VERSION").is_file():
            for d in (data, run, self.layout.pg_dir / "log"):
                d.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(self.layout.pg_dir, user)
                for d in (data, run, self.layout.pg_dir / "log"):
                    shutil.chown(d, user, user)
                if self.as_pg(["test", "-w", str(data)]).returncode != 0:
                    raise StackError(
                        f"the {user} user cannot reach {data} (PostgreSQL refuses to run as root, so it runs as "
                        f"{user}): give its parent folders o+x (e.g. chmod o+x {self.layout.root.resolve().parent}) "
                        "or set STACK_DIR to a folder under /srv or /var/tmp")
            say("initialising PostgreSQL")
            done = self.as_pg([str(PG_BIN / "initdb"), "-D", str(data), "--auth-local=peer",
                               "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"])
            if done.returncode != 0:
                raise StackError(f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        if self.running():
            say(f"PostgreSQL already running on 127.0.0.1:{state['ports']['pg']}")
        else:
            port = state["ports"]["pg"]
            options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={run} "
                       "-c unix_socket_permissions=0700")
            done = self.pg_ctl("start", "-w", "-t", "120", "-l", str(self.layout.pg_dir / "log" / "postgres.log"),
                               "-o", options)
            if done.returncode != 0:
                log = self.layout.pg_dir / "log" / "postgres.log"
                tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise StackError(f"PostgreSQL did not start on 127.0.0.1:{port}:\n{done.stderr[-1000:]}{tail}")
            say(f"PostgreSQL on 127.0.0.1:{port} (data: {data})")
        self.ensure_databases(state, creds)

    def psql(self, sql: str, state: dict) -> str:
        """Run SQL as the cluster's superuser over its private Unix socket; the SQL goes in on stdin, so no
        password ever shows in a process list."""
        done = self.as_pg([str(PG_BIN / "psql"), "-h", str(self.layout.pg_dir / "run"), "-p", str(state["ports"]["pg"]),
                           "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qAt"], input=sql)
        if done.returncode != 0:
            raise StackError(f"psql failed: {done.stderr.strip()[-1000:]}")
        return done.stdout

    def ensure_databases(self, state: dict, creds: dict) -> None:
        for name in ("prefect", "mlflow"):
            password = creds[f"pg_{name}_password"]
            if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{name}';", state).strip():
                self.psql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}';", state)
            if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';", state).strip():
                self.psql(f"CREATE DATABASE {name} OWNER {name};", state)

    def database_url(self, name: str, state: dict, creds: dict, driver: str = "postgresql") -> str:
        return f"{driver}://{name}:{creds[f'pg_{name}_password']}@127.0.0.1:{state['ports']['pg']}/{name}"
