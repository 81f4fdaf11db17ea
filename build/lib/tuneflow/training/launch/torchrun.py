"""torchrun whose rendezvous store listens on one address, not on every interface.

    python -m tuneflow.training.launch.torchrun --rdzv_backend bound --rdzv_endpoint ADDR:PORT --rdzv_conf rank=N \\
        --nnodes M --nproc_per_node P -m tuneflow.training.worker SPEC

torchrun's static rendezvous starts its store (a c10d TCPStore) on every interface of node 0, and PyTorch has no
setting for the address it binds. This runs torchrun with one more rendezvous backend, `bound`: torchrun's static
rendezvous, except that node 0 binds the store's socket to ADDR itself and hands it to the TCPStore
(`master_listen_fd`). On one machine ADDR is 127.0.0.1, so `tuneflow run` listens on loopback only; on several it is
node 0's published address (a host name, as Kubernetes gives, keeps torchrun's way). The launcher
(`tuneflow.training.launch.launcher`) builds the command.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys

from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from tuneflow.training.launch.launcher import RDZV_BACKEND


class BoundStaticRendezvous(StaticTCPRendezvous):
    """The static rendezvous, with node 0's store listening on master_addr only."""

    def get_backend(self) -> str:
        return RDZV_BACKEND

    def next_rendezvous(self):
        if self.rank == 0 and not self._store:
            listener = _listener(self.master_addr, self.master_port)
            if listener is not None:  # TCPStore serves on this socket and closes it with the store
                self._store = TCPStore(self.master_addr, self.master_port, self.world_size, True, self.timeout,
                                       multi_tenant=True, master_listen_fd=listener.detach())
        return super().next_rendezvous()


def _listener(addr: str, port: int) -> socket.socket | None:
    """A socket listening on addr:port; None where addr is a host name (a Kubernetes pod's DNS name may not resolve
    yet when it starts) or an address this machine does not have (behind NAT): there the store listens as
    torchrun's own does, on every interface."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    try:
        return socket.create_server((addr, port), family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                                    backlog=2048)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise


def _create_handler(params: RendezvousParameters) -> BoundStaticRendezvous:
    addr, port = parse_rendezvous_endpoint(params.endpoint, default_port=-1)
    return BoundStaticRendezvous(addr, port, params.get_as_int("rank"), params.max_nodes, params.run_id,
                                 params.get_as_int("timeout", 600))


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun

    rendezvous_handler_registry.register(RDZV_BACKEND, _create_handler)
    torchrun(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
