"""Following a node group (tuneflow.placement.group): the rules both the gpu pool and Kubernetes use."""

import logging

import pytest

from tuneflow.placement import group
from tuneflow.placement.group import GroupStatus, GroupWatch, NodesFailed, NodesLate, NodeStatus


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(group, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(group, "FAILURE_POLL_SECONDS", 0.01)
    monkeypatch.setattr(group, "FAILURE_GRACE_SECONDS", 0.2)


def node(rank, state, ended_at=""):
    started = state != "Pending"
    ended = state in ("Completed", "Failed")
    return NodeStatus(rank, f"node {rank}", state, started=started, ended=ended, failed=state == "Failed",
                      ended_at=ended_at)


def scripted(*polls):
    """A group whose polls return these states, the last one for ever after."""
    seen = []

    def read():
        states = polls[min(len(seen), len(polls) - 1)]
        seen.append(states)
        return GroupStatus([node(rank, *s) if isinstance(s, tuple) else node(rank, s) for rank, s in enumerate(states)])
    return read


def test_the_group_completes_when_every_node_completes(caplog):
    caplog.set_level(logging.INFO)
    watch = GroupWatch(scripted(["Pending", "Pending"], ["Running", "Running"], ["Completed", "Completed"]),
                       join_timeout=60, timeout_s=60, logger=logging.getLogger("t"))
    assert [n.state for n in watch.follow("g", "stopped").nodes] == ["Completed", "Completed"]
    said = [r.getMessage() for r in caplog.records]
    assert said == ["node 0: Pending", "node 1: Pending", "node 0: Running", "node 1: Running",
                    "node 0: Completed", "node 1: Completed"]  # each state once


def test_the_other_nodes_errors_count_and_the_first_failure_comes_first():
    watch = GroupWatch(scripted(["Running", ("Failed", "2")], [("Failed", "3"), ("Failed", "2")]),
                       join_timeout=60, timeout_s=60, logger=logging.getLogger("t"))
    with pytest.raises(NodesFailed) as failed:
        watch.follow("g", "stopped")
    assert [n.label for n in failed.value.status.failed] == ["node 1", "node 0"]


def test_a_failure_ends_the_wait_after_the_grace_even_if_a_node_hangs():
    watch = GroupWatch(scripted(["Running", "Failed"]), join_timeout=60, timeout_s=60, logger=logging.getLogger("t"))
    with pytest.raises(NodesFailed) as failed:
        watch.follow("g", "stopped")
    assert [n.label for n in failed.value.status.failed] == ["node 1"]


def test_a_node_that_never_starts_is_named_after_the_join_timeout():
    watch = GroupWatch(scripted(["Running", "Pending"]), join_timeout=0.1, timeout_s=60, logger=logging.getLogger("t"))
    with pytest.raises(NodesLate) as late:
        watch.follow("g", "stopped")
    assert [n.label for n in late.value.late] == ["node 1"]


def test_the_deadline_says_what_was_done():
    watch = GroupWatch(scripted(["Running"]), join_timeout=60, timeout_s=0.05, logger=logging.getLogger("t"))
    with pytest.raises(TimeoutError, match=r"^g did not finish within train.timeout_hours=1.38889e-05; stopped$"):
        watch.follow("g", "stopped")
