"""The local stack's folder: where each thing lives, its settings (host, ports), its secrets and the client's env
file; and the environment its processes start from."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneflow.core.errors import TuneflowError
from tuneflow.core.ports import free_port, port_free

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # prefect, mlflow and tuneflow of this environment
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
class Layout:
    root: Path

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
        lines = ["# The local tuneflow stack (make stack): `source` this file to use it. Keep it private "
                 "(mode 0600).\n"]
        lines += [f"export {k}={shlex.quote(v)}\n" for k, v in env.items()]
        write_private(self.env_file, "".join(lines))

    def base_env(self) -> dict[str, str]:
        """The caller's environment without any other Prefect or MLflow server's settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true",
                   DO_NOT_TRACK="1")
        # keep the caller's worker tuning (e.g. PREFECT_WORKER_QUERY_SECONDS)
        env.update({k: v for k, v in os.environ.items() if k.startswith("PREFECT_WORKER_")})
        return env
