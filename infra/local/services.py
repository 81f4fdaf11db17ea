"""The stack's services on its PostgreSQL: the Prefect server and the MLflow server, both authenticated; the
deployments (`make deploy`) and one `tuneflow worker` per pool."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from dataclasses import dataclass

import psutil

from infra.local.layout import ADMIN, BIN, REPO, Layout, StackError, say
from infra.local.postgres import Postgres
from infra.local.processes import Processes


@dataclass
class Services:
    layout: Layout
    processes: Processes
    postgres: Postgres

    def start_prefect(self, state: dict, creds: dict) -> None:
        port, urls = state["ports"]["prefect"], self.layout.urls(state)
        if self.processes.running("prefect-server"):
            say(f"Prefect server already running at {urls['prefect']}")
            return
        env = self.layout.base_env()
        env.update(
            PREFECT_HOME=str(self.layout.root / "prefect"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.postgres.database_url("prefect", state, creds,
                                                                           "postgresql+asyncpg"),
            PREFECT_SERVER_API_AUTH_STRING=creds["prefect_auth_string"],
            PREFECT_SERVER_API_HOST=state["host"], PREFECT_SERVER_API_PORT=str(port),  # the UI finds the API by these
            PREFECT_UI_API_URL=f"{urls['prefect']}/api",
        )
        proc = self.processes.spawn("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", state["host"],
                                             "--port", str(port)], env, self.layout.root / "prefect")
        say(f"starting the Prefect server at {urls['prefect']} (on PostgreSQL)")
        self.processes.wait_ready("prefect-server", f"http://127.0.0.1:{port}/api/health", proc)

    def start_mlflow(self, state: dict, creds: dict) -> None:
        port, urls = state["ports"]["mlflow"], self.layout.urls(state)
        if self.processes.running("mlflow-server"):
            say(f"MLflow server already running at {urls['mlflow']}")
            return
        folder = self.layout.root / "mlflow"
        folder.mkdir(exist_ok=True)
        ini = folder / "basic_auth.ini"  # no secret in it: the admin password comes from the environment
        ini.write_text("[mlflow]\n"
                       "default_permission = READ\n"
                       f"database_uri = sqlite:///{(folder / 'basic_auth.db').resolve()}\n"
                       f"admin_username = {ADMIN}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = self.layout.base_env()
        env.update(
            MLFLOW_BACKEND_STORE_URI=self.postgres.database_url("mlflow", state, creds,
                                                                "postgresql+psycopg2"),  # not in argv
            MLFLOW_AUTH_CONFIG_PATH=str(ini.resolve()),
            MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=creds["mlflow_admin_password"],
            MLFLOW_FLASK_SERVER_SECRET_KEY=creds["mlflow_flask_secret_key"],
        )
        cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", state["host"],
               "--port", str(port), "--workers", os.environ.get("STACK_MLFLOW_WORKERS", "2"),
               "--artifacts-destination", str((folder / "artifacts").resolve())]
        proc = self.processes.spawn("mlflow-server", cmd, env, folder)
        say(f"starting the MLflow server at {urls['mlflow']} (on PostgreSQL, artifacts in {folder / 'artifacts'})")
        self.processes.wait_ready("mlflow-server", f"http://127.0.0.1:{port}/health", proc)

    def deploy(self, client: dict[str, str]) -> None:
        """`make deploy` (pools cpu and gpu, the deployments) unless they are all there already."""
        env = {**self.layout.base_env(), **client}
        if all(subprocess.run([str(BIN / "prefect"), "deployment", "inspect", name], env=env,
                              capture_output=True).returncode == 0
               for name in ("tuneflow-finetune/on-demand", "tuneflow-sweep/on-demand", "tuneflow-retrain/scheduled",
                            "tuneflow-train/gpu")):
            say("deployments already registered (after changing them: source the env file, then make deploy)")
            return
        say(f"registering the deployments: make deploy (log: {self.layout.log('deploy')})")
        with open(self.layout.log("deploy"), "ab") as out:
            done = subprocess.run([os.environ.get("MAKE", "make"), "-C", str(REPO), "deploy"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StackError(f"make deploy failed; the end of {self.layout.log('deploy')}:\n"
                             f"{self.processes.tail('deploy')}")

    def start_worker(self, pool: str, client: dict[str, str]) -> None:
        name = f"worker-{pool}"
        if self.processes.running(name):
            say(f"{pool} worker already running")
            return
        folder = self.layout.root / "workers" / pool
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        # TMPDIR of its own: Prefect's runner keeps flow code in $TMPDIR/runner_storage, a folder that another user's
        # worker on the same machine may already own.
        env = {**self.layout.base_env(), **client, "PREFECT_HOME": str(folder / "prefect-home"),
               "TMPDIR": str(folder / "tmp")}
        command = [str(BIN / "tuneflow"), "worker", "--pool", pool, "--name", f"stack-{pool}"]
        proc = self.processes.spawn(name, command, env, folder)
        self.wait_worker(pool, proc, client)

    def wait_worker(self, pool: str, proc: psutil.Process, client: dict[str, str], timeout: float = 120) -> None:
        """Until the worker shows as online in its pool (or exits, e.g. refused by a server)."""
        import httpx

        headers = {"Authorization": "Basic " + base64.b64encode(client["PREFECT_API_AUTH_STRING"].encode()).decode()}
        url = f"{client['PREFECT_API_URL']}/work_pools/{pool}/workers/filter"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                raise StackError(f"the {pool} worker exited; the end of {self.layout.log(f'worker-{pool}')}:\n"
                                 f"{self.processes.tail(f'worker-{pool}')}")
            workers = httpx.post(url, json={}, headers=headers, timeout=10).json()
            if any(w["name"] == f"stack-{pool}" and w.get("status") == "ONLINE" for w in workers):
                say(f"{pool} worker online (pid {proc.pid})")
                return
            time.sleep(1)
        raise StackError(f"the {pool} worker did not come online within {timeout:.0f}s; "
                         f"see {self.layout.log(f'worker-{pool}')}")
