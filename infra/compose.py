"""The Compose stack (infra/compose.yaml) from a checkout: its env file, start and wait, the demo pipeline through it,
stop. `make compose-demo` and `make compose-down` run it:

    python -m infra.compose build [--project P] [--env-file F]
    python -m infra.compose demo [--project P] [--env-file F] [--set train.max_steps=20 ...]
    python -m infra.compose down [--project P] [--env-file F] [--volumes]

`docker compose` (v2) where the Docker CLI has it, else `docker-compose` (v1, 1.29+: what Debian bookworm ships).
Images must exist or be buildable (`make images`, OFFLINE=1 for a host without a registry). Settings come from the
env file (infra/.env; written with random secrets when missing) and, as Compose does, the environment over it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from dotenv import dotenv_values

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
DEMO_ASSETS = REPO / "demo" / "assets"  # the demo's model and data; the workers read demo/ (TUNEFLOW_DATA_DIR)


class ComposeError(RuntimeError):
    """The stack did not start, or a compose command failed; the message says which service and shows its log."""


@functools.cache
def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ComposeError("neither `docker compose` nor `docker-compose` is installed (Debian: apt-get install -y "
                       "docker.io docker-compose)")


def ensure_env_file(path: Path, project: str) -> bool:
    """Write ``path`` (mode 0600) from infra/.env.example unless it exists, for the stack ``project`` of this
    checkout (its demo/ folder the workers' data): each variable set in the environment as it is there (e.g.
    PREFECT_PORT, or the images `make … OFFLINE=1` sets), every change-me a random secret; so that a later plain
    `docker compose --env-file … up` starts the same stack. Returns whether it wrote one."""
    if path.exists():
        return False
    defaults = {"COMPOSE_PROJECT_NAME": project, "TUNEFLOW_DATA_DIR": str(DEMO_ASSETS.parent)}
    lines = []
    for line in (INFRA / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            value = os.environ.get(key, defaults.get(key, value))
            line = f"{key}={value.replace('change-me', secrets.token_hex(16))}"
        lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return True


def settings(env_file: Path) -> dict[str, str]:
    """The stack's variables as Compose sees them: the env file, the environment over it."""
    values = {k: v or "" for k, v in dotenv_values(env_file).items()}
    return {**values, **{k: v for k, v in os.environ.items() if k in values}}


def client_env(env_file: Path) -> dict[str, str]:
    """What a shell on this host sets to use the stack: the published servers and the credentials."""
    s = settings(env_file)
    host = s.get("PUBLISH_HOST") or "127.0.0.1"
    host = "127.0.0.1" if host == "0.0.0.0" else host
    return {"PREFECT_API_URL": f"http://{host}:{s.get('PREFECT_PORT') or 4200}/api",
            "PREFECT_API_AUTH_STRING": s["PREFECT_AUTH_STRING"],
            "MLFLOW_TRACKING_URI": f"http://{host}:{s.get('MLFLOW_PORT') or 5000}",
            "MLFLOW_TRACKING_USERNAME": s.get("MLFLOW_ADMIN_USERNAME") or "admin",
            "MLFLOW_TRACKING_PASSWORD": s["MLFLOW_ADMIN_PASSWORD"]}


class Stack:
    """One Compose project of infra/compose.yaml (plus ``files``) with its env file."""

    def __init__(self, project: str, env_file: Path, files: tuple[Path, ...] = ()):
        self.project, self.env_file, self.files = project, Path(env_file).resolve(), (COMPOSE_FILE, *files)

    def command(self, *args: str) -> list[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        return [*compose_command(), "-p", self.project, "--env-file", str(self.env_file), *files, *args]

    def run(self, *args: str, capture: bool = False, timeout: float = 1800) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*args), cwd=INFRA, capture_output=capture, text=True, timeout=timeout)
        if done.returncode != 0:
            raise ComposeError(f"`{' '.join(args)}` failed ({done.returncode})"
                               + (f": {done.stderr[-3000:]}" if capture else ""))
        return done

    def services(self) -> dict[str, dict]:
        """service -> its definition, as Compose resolves the files."""
        return yaml.safe_load(self.run("config", capture=True).stdout)["services"]

    def containers(self) -> dict[str, dict]:
        """service -> `docker inspect` of its container."""
        ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
                             capture_output=True, text=True, check=True).stdout.split()
        if not ids:
            return {}
        found = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True,
                                          check=True).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in found}

    def logs(self, service: str, tail: int = 60) -> str:
        done = subprocess.run(self.command("logs", "--no-color", "--tail", str(tail), service), cwd=INFRA,
                              capture_output=True, text=True)
        return done.stdout + done.stderr

    def wait_ready(self, timeout: float = 600) -> None:
        """Until every service is healthy and the one-shot ones exited 0; a container that exits or turns
        unhealthy stops the wait with its log."""
        services = self.services()
        one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
        deadline, shown = time.monotonic() + timeout, ""
        while True:
            states = {}
            for service, c in self.containers().items():
                state = c["State"]
                states[service] = (state.get("Health") or {}).get("Status") or state["Status"]
                if service in one_shot and state["Status"] == "exited":
                    states[service] = "done" if state["ExitCode"] == 0 else f"exited {state['ExitCode']}"
            bad = [s for s, st in states.items() if st == "unhealthy" or st.startswith("exited")]
            if bad:
                raise ComposeError("\n".join(f"{s}: {states[s]}\n{self.logs(s)}" for s in bad))
            line = "  ".join(f"{s} {st}" for s, st in sorted(states.items()))
            if line != shown:
                print(f"compose: {line}", flush=True)
                shown = line
            waiting = [s for s in services if states.get(s) != ("done" if s in one_shot else "healthy")]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise ComposeError(f"not ready after {timeout:.0f} s: {', '.join(waiting)}\n"
                                   + "\n".join(self.logs(s) for s in waiting))
            time.sleep(3)

    def up(self, timeout: float = 600) -> None:
        self.run("up", "-d")
        self.wait_ready(timeout)

    def down(self, volumes: bool = False) -> None:
        self.run("down", *(["--volumes"] if volumes else []))


def demo(stack: Stack, overrides: list[str]) -> int:
    """The demo pipeline through the stack from this host: its tiny model and data under demo/ (mounted into the
    workers at the same path), `tuneflow submit --config configs/demo.yaml --wait` with the stack's credentials."""
    from tuneflow.modeling.demo import build, readable_weights

    if not (DEMO_ASSETS / "model").is_dir():
        build(DEMO_ASSETS)
    readable_weights(DEMO_ASSETS / "model")  # assets made before `build` did this were unreadable by the workers
    mounted = Path(settings(stack.env_file).get("TUNEFLOW_DATA_DIR") or "/srv/tuneflow")
    if not DEMO_ASSETS.is_relative_to(mounted):
        raise ComposeError(f"the workers read {mounted} (TUNEFLOW_DATA_DIR in {stack.env_file}), not the demo's "
                           f"{DEMO_ASSETS}: set TUNEFLOW_DATA_DIR={DEMO_ASSETS.parent} there")
    print(f"compose: starting project {stack.project}", flush=True)
    stack.up()
    env = {**os.environ, **client_env(stack.env_file)}
    cmd = [sys.executable, "-m", "tuneflow.cli.main", "submit", "--config", "configs/demo.yaml", "--wait",
           *[arg for override in overrides for arg in ("--set", override)]]
    done = subprocess.run(cmd, cwd=REPO, env=env)
    print(f"compose: the stack stays up (project {stack.project}): Prefect {env['PREFECT_API_URL'][:-4]}, MLflow "
          f"{env['MLFLOW_TRACKING_URI']}; credentials in {stack.env_file}; `make compose-down` stops it")
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.compose", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "demo", "down"])
    parser.add_argument("--project", default="tuneflow-demo", help="the Compose project name")
    parser.add_argument("--env-file", type=Path, default=INFRA / ".env", help="settings and secrets (infra/.env)")
    parser.add_argument("--volumes", action="store_true", help="down: remove the named volumes too (all data)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="demo: config overrides, key=value")
    args = parser.parse_args(argv)
    stack = Stack(args.project, args.env_file)
    if args.action != "down" and ensure_env_file(stack.env_file, args.project):
        print(f"compose: wrote {stack.env_file} with random secrets (mode 0600)")
    try:
        if args.action == "build":
            stack.run("build")
            return 0
        if args.action == "down":
            stack.down(volumes=args.volumes)
            return 0
        return demo(stack, args.overrides)
    except ComposeError as e:
        print(f"compose: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
