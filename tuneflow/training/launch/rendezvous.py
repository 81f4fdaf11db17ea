"""Where the nodes of one multi-node training attempt meet, with no address typed by hand.

The train stage starts train.nnodes flow runs of the training deployment, one per node, each with the same request,
its node rank and a rendezvous id. Node 0 picks its address (TUNEFLOW_NODE_ADDR if the worker sets it, else the
address of its interface that reaches the Prefect API) and a free port, and publishes them, with its number of
training processes, as the Prefect Variable `tuneflow-rdzv-<id>`; the other nodes poll for it, at most
train.join_timeout seconds. Every node then runs torchrun with the same nnodes, master address and port, its own
node rank, and the rendezvous id; torchrun's rendezvous waits at most train.join_timeout for all nodes too. The
stage deletes the variable when the attempt ends.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from tuneflow.core.errors import RunFailed
from tuneflow.core.ports import free_port

NODE_ADDR_ENV = "TUNEFLOW_NODE_ADDR"
POLL_SECONDS = 1.0


class JoinFailed(RunFailed):
    """This node could not take its place in the rendezvous."""


@dataclass(frozen=True)
class Rendezvous:
    """One node's place in a training attempt: what torchrun needs on this node."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free one (single node)
    rdzv_id: str | None = None
    join_timeout: float = 600

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1


def variable_name(rdzv_id: str) -> str:
    return f"tuneflow-rdzv-{rdzv_id}".lower()


def node_address(api_url: str | None = None) -> str:
    """TUNEFLOW_NODE_ADDR, else the local address of the interface that reaches the Prefect API (no packet is sent:
    connecting a UDP socket only picks the route)."""
    if os.environ.get(NODE_ADDR_ENV):
        return os.environ[NODE_ADDR_ENV]
    from prefect.settings import PREFECT_API_URL

    url = urlparse(api_url or PREFECT_API_URL.value() or "")
    if not url.hostname:
        raise JoinFailed(f"no Prefect API to find this node's address from; set {NODE_ADDR_ENV} on the worker to the "
                         "address the other GPU machines reach this one at")
    port = url.port or (443 if url.scheme == "https" else 80)
    family, _, _, _, sockaddr = socket.getaddrinfo(url.hostname, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def publish(rdzv_id: str, addr: str, port: int, nproc: int) -> None:
    from prefect.variables import Variable

    Variable.set(variable_name(rdzv_id), {"addr": addr, "port": port, "nproc": nproc}, overwrite=True)


def remove(rdzv_id: str) -> None:
    from prefect.variables import Variable

    Variable.unset(variable_name(rdzv_id))


def wait_for_node0(rdzv_id: str, timeout: float, logger) -> dict:
    """Node 0's published {addr, port, nproc}; JoinFailed after ``timeout`` seconds without it."""
    from prefect.variables import Variable

    name, deadline = variable_name(rdzv_id), time.monotonic() + timeout
    logger.info("waiting for node 0 to publish its address (Prefect Variable %s, at most %gs)", name, timeout)
    while True:
        found = Variable.get(name)
        if found:
            return found
        if time.monotonic() > deadline:
            raise JoinFailed(f"node 0 did not publish its address within train.join_timeout={timeout:g}s "
                             f"(Prefect Variable {name})")
        time.sleep(POLL_SECONDS)


def join(nnodes: int, node_rank: int, rdzv_id: str, nproc: int, master_port: int, join_timeout: float,
         logger) -> Rendezvous:
    """This node's place: node 0 publishes its address and port; the others wait for them."""
    if node_rank == 0:
        addr = node_address()
        port = master_port or free_port(addr)
        publish(rdzv_id, addr, port, nproc)
        logger.info("node 0 of %d: rendezvous at %s:%d (published as Prefect Variable %s)", nnodes, addr, port,
                    variable_name(rdzv_id))
    else:
        found = wait_for_node0(rdzv_id, join_timeout, logger)
        addr, port = found["addr"], int(found["port"])
        if int(found["nproc"]) != nproc:
            raise JoinFailed(f"node {node_rank} has {nproc} training processes, node 0 has {found['nproc']}: every "
                             "node runs the same number; set train.nproc_per_node, or use machines with as many GPUs")
        logger.info("node %d of %d: joining the rendezvous at %s:%d", node_rank, nnodes, addr, port)
    return Rendezvous(nnodes=nnodes, node_rank=node_rank, master_addr=addr, master_port=port, rdzv_id=rdzv_id,
                      join_timeout=join_timeout)
