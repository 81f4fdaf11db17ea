"""Launching the training worker under torchrun and streaming its output.

A rank that fails leaves <output>/errors/rank<N>.txt (written by the worker); the launcher turns that into an
error that names the rank and its message instead of torchrun's bare exit code.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tuneflow.core.errors import RunFailed
from tuneflow.core.ports import free_port

RDZV_BACKEND = "bound"  # torchrun's static rendezvous, its store bound to the master address (training/torchrun.py)


class WorkerFailed(RunFailed):
    pass


def torchrun_command(spec: Path, nproc: int, master_port: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, rdzv_id: str | None = None,
                     join_timeout: float | None = None) -> list[str]:
    """torchrun with its rendezvous at master_addr:master_port, where node 0 hosts the store, listening on that
    address only (`tuneflow.training.launch.torchrun`); on several nodes, the attempt's rendezvous id and how long the
    rendezvous waits for every node (join_timeout seconds)."""
    if nnodes > 1 and not (master_addr and master_port):
        raise ValueError("a multi-node launch needs node 0's address and port")
    conf = f"rank={node_rank}" + (f",timeout={int(join_timeout)}" if join_timeout else "")
    return [
        sys.executable, "-m", "tuneflow.training.launch.torchrun",
        "--nnodes", str(nnodes),
        "--nproc_per_node", str(nproc),
        "--rdzv_backend", RDZV_BACKEND,
        "--rdzv_endpoint", f"{master_addr or '127.0.0.1'}:{master_port or free_port()}",
        "--rdzv_conf", conf,
        *(["--rdzv_id", rdzv_id] if rdzv_id else []),
        "-m", "tuneflow.training.worker",
        str(spec),
    ]


def loopback_env() -> dict[str, str]:
    """On one machine, the collectives' sockets (gloo, NCCL's bootstrap) on the loopback interface, unless set."""
    import psutil

    names = [name for name, addrs in psutil.net_if_addrs().items()
             if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs)]
    if not names:
        return {}
    return {var: os.environ.get(var, names[0]) for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def rank_errors(errors_dir: Path) -> list[str]:
    """'rank N: <first line of its error>' for every rank that wrote one, lowest rank first."""
    found = []
    for file in sorted(errors_dir.glob("rank*.txt"), key=lambda p: int(p.stem[4:])):
        first = file.read_text(errors="replace").splitlines()[0][:400] if file.stat().st_size else "(empty)"
        found.append(f"rank {file.stem[4:]}: {first}")
    return found


_FAILURE_ENTRY = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def dead_ranks(output: str) -> list[str]:
    """Ranks that torchrun reports killed by a signal (not counting the SIGTERM it sends the survivors)."""
    report = output[output.rfind("Failures:"):] if "Failures:" in output else ""
    found = []
    for rank, code in _FAILURE_ENTRY.findall(report):
        number = -int(code)
        if number > 0 and number != signal.SIGTERM:
            name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
            found.append(f"rank {rank}: exit code {code} ({name})")
    return list(dict.fromkeys(found))


def _terminate_with_parent() -> None:
    """In the torchrun child: get SIGTERM when the launching process dies, even by SIGKILL (a cancelled flow run),
    so no training keeps a GPU busy for nobody (Linux only; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch(spec: Path, nproc: int, master_port: int, env: dict[str, str], on_line: Callable[[str], None],
           nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None, rdzv_id: str | None = None,
           join_timeout: float | None = None) -> None:
    """Run the worker on ``nproc`` processes (on this node of ``nnodes``); raise WorkerFailed naming failed ranks."""
    errors_dir = Path(spec).parent / "errors"
    if errors_dir.exists():
        for stale in errors_dir.glob("rank*.txt"):
            stale.unlink()
    cmd = torchrun_command(spec, nproc, master_port, nnodes, node_rank, master_addr, rdzv_id, join_timeout)
    on_line("launching: " + " ".join(cmd))
    local = loopback_env() if nnodes == 1 else {}
    proc = subprocess.Popen(
        cmd, env={**os.environ, **local, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1, errors="replace", preexec_fn=_terminate_with_parent,
    )
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                on_line(line)
                tail = (tail + [line])[-200:]
        code = proc.wait()
    except BaseException:  # cancelled or interrupted: torchrun stops its ranks on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        # A rank killed outright writes nothing; its peers then fail on the broken connection: name the killed first.
        ranks = dead_ranks("\n".join(tail)) + rank_errors(errors_dir)
        detail = "; ".join(ranks) if ranks else "no rank reported an error; last output:\n" + "\n".join(tail[-20:])
        raise WorkerFailed(f"training failed (torchrun exit code {code}): {detail}")
