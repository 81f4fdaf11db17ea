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

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tuneflow.core.ports import free_port, port_free
from tuneflow.core.errors import TuneflowError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # prefect, mlflow and tuneflow of this environment
PG_BIN = Path(os.environ.get("STACK_PG_BIN", "/usr/lib/postgresql/15/bin"))
DEFAULT_PORTS = {"pg": 5433, "prefect": 4200, "mlflow": 5000}
ADMIN = "admin"
# The variables a client needs; their values are in <stack>/env (mode 0600), never printed.
CLIENT_VARS = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD")


class StackError(TuneflowError, RuntimeError):
    """Something the user must fix; the message says what."""


def say(message: str) -> None:
    print(f"stack: {message}", flush=True)


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, created with that mode (never readable for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


@dataclass
class Stack:
    root: Path

    # ---- layout -------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"  # ports and host: no secrets

    @property
    def secrets_file(self) -> Path:
        return self.root / "secrets.json"  # the servers' secrets, mode 0600

    @property
    def env_file(self) -> Path:
        return self.root / "env"  # what a client sources, mode 0600

    def pid_file(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    # ---- settings, secrets ---------------------------------------------------------------------------------------
    def load_state(self) -> dict:
        state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        host = os.environ.get("STACK_HOST") or state.get("host") or "127.0.0.1"
        ports = state.get("ports", {})
        for name, default in DEFAULT_PORTS.items():
            configured = os.environ.get(f"STACK_{name.upper()}_PORT")
            if configured:
                ports[name] = int(configured)
            elif name not in ports:
                ports[name] = default if port_free(default) else free_port()
        state = {"host": host, "ports": ports}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")
        return state

    def load_secrets(self) -> dict:
        if self.secrets_file.is_file():
            return json.loads(self.secrets_file.read_text())
        token = lambda: secrets.token_urlsafe(24)  # noqa: E731  (URL-safe: goes into database URLs as is)
        created = {"prefect_auth_string": f"{ADMIN}:{token()}", "mlflow_admin_password": token(),
                   "mlflow_flask_secret_key": token(), "pg_prefect_password": token(),
                   "pg_mlflow_password": token()}
        write_private(self.secrets_file, json.dumps(created, indent=2) + "\n")
        say(f"generated credentials in {self.secrets_file} and {self.env_file} (mode 0600)")
        return created

    def urls(self, state: dict) -> dict:
        host = state["host"]
        shown = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
        return {"prefect": f"http://{shown}:{state['ports']['prefect']}",
                "mlflow": f"http://{shown}:{state['ports']['mlflow']}"}

    def client_env(self, state: dict, creds: dict) -> dict[str, str]:
        urls = self.urls(state)
        return {"PREFECT_API_URL": f"{urls['prefect']}/api", "PREFECT_API_AUTH_STRING": creds["prefect_auth_string"],
                "MLFLOW_TRACKING_URI": urls["mlflow"], "MLFLOW_TRACKING_USERNAME": ADMIN,
                "MLFLOW_TRACKING_PASSWORD": creds["mlflow_admin_password"]}

    def write_env_file(self, env: dict[str, str]) -> None:
        lines = ["# The local tuneflow stack (make stack): `source` this file to use it. Keep it private (mode 0600).\n"]
        lines += [f"export {k}={shlex.quote(v)}\n" for k, v in env.items()]
        write_private(self.env_file, "".join(lines))

    # ---- processes ------------------------------------------------------------------------------------------------
    def running(self, name: str) -> psutil.Process | None:
        """The process `start` recorded under ``name``, if it still runs (same pid and start time)."""
        path = self.pid_file(name)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        try:
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["create_time"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        return None

    def spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> psutil.Process:
        """Start ``cmd`` in a process group of its own (its pid is the group id), output to logs/<name>.log."""
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log(name), "ab") as out:
            popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = psutil.Process(popen.pid)
        self.pid_file(name).write_text(json.dumps({"pid": popen.pid, "create_time": proc.create_time(),
                                                   "cmd": cmd[:4]}) + "\n")
        return proc

    def wait_ready(self, name: str, url: str, proc: psutil.Process, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                raise StackError(f"{name} exited during start-up; the end of {self.log(name)}:\n{self.tail(name)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(f"{name} did not answer {url} within {timeout:.0f}s; see {self.log(name)}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop_process(self, name: str, timeout: float = 30) -> bool:
        """SIGTERM the recorded process, its process group and every descendant (a worker's flow runs and their
        training processes may sit in sessions of their own); SIGKILL what is left after ``timeout``."""
        proc = self.running(name)
        self.pid_file(name).unlink(missing_ok=True)
        if proc is None:
            return False
        try:
            family = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            family = [proc]
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # one signal each: Prefect's CLI escalates on a second one
        except ProcessLookupError:
            pass
        for p in family:
            try:
                if os.getpgid(p.pid) != proc.pid:  # outside the group: not signalled yet
                    p.terminate()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything still in the group
        except ProcessLookupError:
            pass
        return True

    # ---- PostgreSQL -----------------------------------------------------------------------------------------------
    def pg_user(self) -> str | None:
        """initdb and postgres refuse root: as root, PostgreSQL runs as the `postgres` user."""
        return "postgres" if os.geteuid() == 0 else None

    def as_pg(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        user = self.pg_user()
        full = (["runuser", "-u", user, "--"] if user else []) + cmd
        return subprocess.run(full, capture_output=True, text=True, **kw)

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.as_pg([str(PG_BIN / "pg_ctl"), "-D", str(self.pg_dir / "data"), *args])

    def pg_running(self) -> bool:
        return (self.pg_dir / "data" / "PG_VERSION").is_file() and self.pg_ctl("status").returncode == 0

    def start_postgres(self, state: dict, creds: dict) -> None:
        if not (PG_BIN / "initdb").is_file():
            raise StackError(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb is missing): "
                             "apt-get install postgresql-15, or set STACK_PG_BIN to its bin folder")
        data, run = self.pg_dir / "data", self.pg_dir / "run"
        user = self.pg_user()
        if not (data / "PG_VERSION").is_file():
            for d in (data, run, self.pg_dir / "log"):
                d.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(self.pg_dir, user)
                for d in (data, run, self.pg_dir / "log"):
                    shutil.chown(d, user, user)
                if self.as_pg(["test", "-w", str(data)]).returncode != 0:
                    raise StackError(
                        f"the {user} user cannot reach {data} (PostgreSQL refuses to run as root, so it runs as "
                        f"{user}): give its parent folders o+x (e.g. chmod o+x {self.root.resolve().parent}) "
                        "or set STACK_DIR to a folder under /srv or /var/tmp")
            say("initialising PostgreSQL")
            done = self.as_pg([str(PG_BIN / "initdb"), "-D", str(data), "--auth-local=peer",
                               "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"])
            if done.returncode != 0:
                raise StackError(f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        if self.pg_running():
            say(f"PostgreSQL already running on 127.0.0.1:{state['ports']['pg']}")
        else:
            port = state["ports"]["pg"]
            options = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={run} "
                       "-c unix_socket_permissions=0700")
            done = self.pg_ctl("start", "-w", "-t", "120", "-l", str(self.pg_dir / "log" / "postgres.log"),
                               "-o", options)
            if done.returncode != 0:
                log = self.pg_dir / "log" / "postgres.log"
                tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
                raise StackError(f"PostgreSQL did not start on 127.0.0.1:{port}:\n{done.stderr[-1000:]}{tail}")
            say(f"PostgreSQL on 127.0.0.1:{port} (data: {data})")
        self.ensure_databases(state, creds)

    def psql(self, sql: str, state: dict) -> str:
        """Run SQL as the cluster's superuser over its private Unix socket; the SQL goes in on stdin, so no
        password ever shows in a process list."""
        done = self.as_pg([str(PG_BIN / "psql"), "-h", str(self.pg_dir / "run"), "-p", str(state["ports"]["pg"]),
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

    # ---- servers --------------------------------------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        """The caller's environment without any other Prefect or MLflow server's settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
                   DO_NOT_TRACK="1")
        # keep the caller's worker tuning (e.g. PREFECT_WORKER_QUERY_SECONDS)
        env.update({k: v for k, v in os.environ.items() if k.startswith("PREFECT_WORKER_")})
        return env

    def start_prefect(self, state: dict, creds: dict) -> None:
        port, urls = state["ports"]["prefect"], self.urls(state)
        if self.running("prefect-server"):
            say(f"Prefect server already running at {urls['prefect']}")
            return
        env = self.base_env()
        env.update(
            PREFECT_HOME=str(self.root / "prefect"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.database_url("prefect", state, creds, "postgresql+asyncpg"),
            PREFECT_SERVER_API_AUTH_STRING=creds["prefect_auth_string"],
            PREFECT_SERVER_API_HOST=state["host"], PREFECT_SERVER_API_PORT=str(port),  # the UI finds the API by these
            PREFECT_UI_API_URL=f"{urls['prefect']}/api",
        )
        proc = self.spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", state["host"],
                                             "--port", str(port)], env, self.root / "prefect")
        say(f"starting the Prefect server at {urls['prefect']} (on PostgreSQL)")
        self.wait_ready("prefect-server", f"http://127.0.0.1:{port}/api/health", proc)

    def start_mlflow(self, state: dict, creds: dict) -> None:
        port, urls = state["ports"]["mlflow"], self.urls(state)
        if self.running("mlflow-server"):
            say(f"MLflow server already running at {urls['mlflow']}")
            return
        folder = self.root / "mlflow"
        folder.mkdir(exist_ok=True)
        ini = folder / "basic_auth.ini"  # no secret in it: the admin password comes from the environment
        ini.write_text("[mlflow]\n"
                       "default_permission = READ\n"
                       f"database_uri = sqlite:///{(folder / 'basic_auth.db').resolve()}\n"
                       f"admin_username = {ADMIN}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = self.base_env()
        env.update(
            MLFLOW_BACKEND_STORE_URI=self.database_url("mlflow", state, creds, "postgresql+psycopg2"),  # not in argv
            MLFLOW_AUTH_CONFIG_PATH=str(ini.resolve()),
            MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=creds["mlflow_admin_password"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=creds["mlflow_flask_secret_key"],
        )
        cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", state["host"],
               "--port", str(port), "--workers", os.environ.get("STACK_MLFLOW_WORKERS", "2"),
               "--artifacts-destination", str((folder / "artifacts").resolve())]
        proc = self.spawn("mlflow-server", cmd, env, folder)
        say(f"starting the MLflow server at {urls['mlflow']} (on PostgreSQL, artifacts in {folder / 'artifacts'})")
        self.wait_ready("mlflow-server", f"http://127.0.0.1:{port}/health", proc)

    def deploy(self, client: dict[str, str]) -> None:
        """`make deploy` (pools cpu and gpu, the deployments) unless they are all there already."""
        env = {**self.base_env(), **client}
        if all(subprocess.run([str(BIN / "prefect"), "deployment", "inspect", name], env=env,
                              capture_output=True).returncode == 0
               for name in ("tuneflow-finetune/on-demand", "tuneflow-retrain/scheduled", "tuneflow-train/gpu")):
            say("deployments already registered (after changing them: source the env file, then make deploy)")
            return
        say(f"registering the deployments: make deploy (log: {self.log('deploy')})")
        with open(self.log("deploy"), "ab") as out:
            done = subprocess.run([os.environ.get("MAKE", "make"), "-C", str(REPO), "deploy"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StackError(f"make deploy failed; the end of {self.log('deploy')}:\n{self.tail('deploy')}")

    def start_worker(self, pool: str, client: dict[str, str]) -> None:
        name = f"worker-{pool}"
        if self.running(name):
            say(f"{pool} worker already running")
            return
        folder = self.root / "workers" / pool
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        # TMPDIR of its own: Prefect's runner keeps flow code in $TMPDIR/runner_storage, a folder that another user's
        # worker on the same machine may already own.
        env = {**self.base_env(), **client, "PREFECT_HOME": str(folder / "prefect-home"), "TMPDIR": str(folder / "tmp")}
        proc = self.spawn(name, [str(BIN / "tuneflow"), "worker", "--pool", pool, "--name", f"stack-{pool}"], env,
                          folder)
        self.wait_worker(pool, proc, client)

    def wait_worker(self, pool: str, proc: psutil.Process, client: dict[str, str], timeout: float = 120) -> None:
        """Until the worker shows as online in its pool (or exits, e.g. refused by a server)."""
        import httpx

        headers = {"Authorization": "Basic " + base64.b64encode(client["PREFECT_API_AUTH_STRING"].encode()).decode()}
        url = f"{client['PREFECT_API_URL']}/work_pools/{pool}/workers/filter"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                raise StackError(f"the {pool} worker exited; the end of {self.log(f'worker-{pool}')}:\n"
                                 f"{self.tail(f'worker-{pool}')}")
            workers = httpx.post(url, json={}, headers=headers, timeout=10).json()
            if any(w["name"] == f"stack-{pool}" and w.get("status") == "ONLINE" for w in workers):
                say(f"{pool} worker online (pid {proc.pid})")
                return
            time.sleep(1)
        raise StackError(f"the {pool} worker did not come online within {timeout:.0f}s; see {self.log(f'worker-{pool}')}")

    # ---- commands -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        for d in (self.root, self.root / "pids", self.root / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(self.root, 0o711)  # the postgres user must pass through to its data folder; nothing to list
        state, creds = self.load_state(), self.load_secrets()
        client = self.client_env(state, creds)
        self.write_env_file(client)
        self.start_postgres(state, creds)
        self.start_prefect(state, creds)
        self.start_mlflow(state, creds)
        from tuneflow.tracking.servers import check_mlflow, check_prefect

        check_prefect(client["PREFECT_API_URL"], client["PREFECT_API_AUTH_STRING"])
        os.environ.update({k: v for k, v in client.items() if k.startswith("MLFLOW_")})
        check_mlflow(client["MLFLOW_TRACKING_URI"])
        self.deploy(client)
        for pool in os.environ.get("STACK_POOLS", "cpu gpu").split():
            self.start_worker(pool, client)
        self.report(state)

    def report(self, state: dict) -> None:
        urls, env_file = self.urls(state), self.env_file
        try:
            env_file = env_file.relative_to(Path.cwd())
        except ValueError:
            pass
        print(f"""
tuneflow stack is up (folder {self.root}):
  Prefect    {urls['prefect']}      UI and API ({urls['prefect']}/api), on PostgreSQL 127.0.0.1:{state['ports']['pg']}/prefect
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
            if self.stop_process(name):
                say(f"stopped {name}")
        if self.pg_running():
            done = self.pg_ctl("stop", "-w", "-t", "60", "-m", "fast")
            if done.returncode != 0:
                raise StackError(f"pg_ctl stop failed: {done.stderr.strip()}")
            say("stopped PostgreSQL")
        say(f"stopped; data, credentials and logs stay in {self.root} (rm -rf it to start afresh)")

    def status(self) -> int:
        state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else None
        if state is None:
            print(f"no stack in {self.root}")
            return 1
        up = {"postgres": self.pg_running()}
        for pid in sorted((self.root / "pids").glob("*.pid")):
            up[pid.stem] = self.running(pid.stem) is not None
        for name, ok in up.items():
            print(f"{name:15s} {'running' if ok else 'stopped'}")
        urls = self.urls(state)
        print(f"Prefect {urls['prefect']}   MLflow {urls['mlflow']}   env: {self.env_file}")
        return 0 if all(up.values()) else 3
