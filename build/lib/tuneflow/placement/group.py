"""Following a group of training nodes to its end, whatever runs them (flow runs on the gpu pool, the pods of a
Kubeflow TrainJob): one set of rules and constants.

- Each node's state is logged when it changes.
- The group completes when its runner says so.
- After the first failure the other nodes get FAILURE_GRACE_SECONDS to end on their own, so that their errors count
  too, then `NodesFailed` names the failed nodes, the first to fail first.
- A node that has not started `join_timeout` seconds after the first one did raises `NodesLate`.
- After `timeout_s` a `TimeoutError`.
The caller stops what is left of the group whenever `follow` raises (cancels the flow runs, deletes the TrainJob).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tuneflow.core.progress import StateLog

POLL_SECONDS = 2
FAILURE_POLL_SECONDS = 1  # while the other nodes get their grace
FAILURE_GRACE_SECONDS = 20  # after a node fails, how long the others get to end on their own (their errors count)


@dataclass
class NodeStatus:
    rank: int
    label: str  # e.g. "node 1 (flow run X on worker W)", "node 1 (pod P on host H)"
    state: str
    started: bool = False  # running, or already ended
    ended: bool = False
    failed: bool = False  # ended without completing
    ended_at: str = ""  # sortable; names the first failure first
    source: Any = None  # the runner's own record (a flow run, a pod's Node)


@dataclass
class GroupStatus:
    nodes: list[NodeStatus]
    complete: bool = False  # the runner says the group completed
    failure: str | None = None  # the runner says the group failed (e.g. a TrainJob's Failed condition)

    @property
    def failed(self) -> list[NodeStatus]:
        return sorted((n for n in self.nodes if n.failed), key=lambda n: n.ended_at or "~")


class NodesFailed(Exception):
    def __init__(self, status: GroupStatus):
        super().__init__("; ".join(n.label for n in status.failed) or status.failure)
        self.status = status


class NodesLate(Exception):
    def __init__(self, late: list[NodeStatus]):
        super().__init__("; ".join(n.label for n in late))
        self.late = late


@dataclass
class GroupWatch:
    read: Callable[[], GroupStatus]
    join_timeout: float
    timeout_s: float
    logger: Any
    prefix: str = ""  # before each progress line, e.g. "TrainJob X: "
    log: StateLog = field(init=False)

    def __post_init__(self):
        self.log = StateLog(lambda text: self.logger.info("%s", text))

    def follow(self, what: str, stopped: str) -> GroupStatus:
        """Poll until the group completes; raise as the module says. ``what`` names the group in a timeout's
        message, ``stopped`` says what the caller then does to it."""
        deadline, first_started, failed_at = time.monotonic() + self.timeout_s, None, None
        while True:
            status = self.read()
            for node in status.nodes:
                self.log.note(node.rank, f"{self.prefix}{node.label}: {node.state}")
            now = time.monotonic()
            if status.complete or (status.nodes and all(n.ended and not n.failed for n in status.nodes)):
                return status
            if (status.failed or status.failure) and failed_at is None:
                failed_at = now
            if failed_at is not None and (now - failed_at >= FAILURE_GRACE_SECONDS
                                          or all(n.ended for n in status.nodes)):
                raise NodesFailed(status)
            if first_started is None and any(n.started for n in status.nodes):
                first_started = now
            if first_started is not None and failed_at is None and now - first_started > self.join_timeout:
                late = [n for n in status.nodes if not n.started]
                if late:
                    raise NodesLate(late)
            if now > deadline:
                raise TimeoutError(f"{what} did not finish within train.timeout_hours={self.timeout_s / 3600:g}; "
                                   f"{stopped}")
            time.sleep(FAILURE_POLL_SECONDS if failed_at else POLL_SECONDS)
