"""The stack's processes: each started in a process group of its own, recorded by pid and start time under
<stack>/pids, its output in <stack>/logs; stopped with every descendant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from infra.local.layout import Layout, StackError


@dataclass
class Processes:
    layout: Layout

    def running(self, name: str) -> psutil.Process | None:
        """The process `start` recorded under ``name``, if it still runs (same pid and start time)."""
        path = self.layout.pid_file(name)
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
        with open(self.layout.log(name), "ab") as out:
            popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        proc = psutil.Process(popen.pid)
        self.layout.pid_file(name).write_text(json.dumps({"pid": popen.pid, "create_time": proc.create_time(),
                                                   "cmd": cmd[:4]}) + "\n")
        return proc

    def wait_ready(self, name: str, url: str, proc: psutil.Process, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                raise StackError(f"{name} exited during start-up; the end of {self.layout.log(name)}:\n"
                                 f"{self.tail(name)}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(f"{name} did not answer {url} within {timeout:.0f}s; see {self.layout.log(name)}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.layout.log(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop_process(self, name: str, timeout: float = 30) -> bool:
        """SIGTERM the recorded process, its process group and every descendant (a worker's flow runs and their
        training processes may sit in sessions of their own); SIGKILL what is left after ``timeout``."""
        proc = self.running(name)
        self.layout.pid_file(name).unlink(missing_ok=True)
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
