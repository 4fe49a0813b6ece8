"""TCP links between the main host and its agents: framing, greetings, addresses.

Every connection to the main host's distributed address starts with a greeting,
``("agent", {...})`` from an agent (the supervisor on a host, kept for heartbeats and
orders) or ``("worker", {...})`` from the JAX process an agent started (kept for
batches). Messages are the project's length-prefixed pickled frames
(`mserve.devices.channel.Channel`): the hosts of one group trust each other as the
device processes of one host do, so the distributed address must only be reachable
from the group's hosts.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from ..devices.channel import Channel, ChannelClosed

__all__ = ["Link", "ChannelClosed", "parse_address", "connect", "listen"]


def parse_address(address: str, what: str = "distributed address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port), or a ValueError naming it."""
    text = str(address).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {address!r} is not HOST:PORT (for example 127.0.0.1:6200)")
    return host.strip("[]"), int(port)


class Link:
    """One peer's channel, safe to send on from several threads."""

    def __init__(self, sock: socket.socket, peer: str):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.peer = peer
        self.channel = Channel(sock)
        self._send_lock = threading.Lock()
        self.closed = False

    def send(self, message: Any) -> None:
        with self._send_lock:
            self.channel.send(message)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message; ``socket.timeout`` when none came within ``timeout``;
        `ChannelClosed` when the peer is gone."""
        self.sock.settimeout(timeout)
        try:
            return self.channel.recv()
        except OSError as exc:
            if isinstance(exc, socket.timeout):
                raise
            raise ChannelClosed(f"connection to {self.peer} lost: {exc}") from None

    def close(self) -> None:
        """Close; a thread blocked in `recv` on this link wakes with `ChannelClosed`."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.channel.close()


def connect(address: str, timeout: float = 5.0) -> Link:
    host, port = parse_address(address)
    sock = socket.create_connection((host, port), timeout=timeout)
    return Link(sock, address)


def listen(address: str) -> socket.socket:
    """A listening socket on ``address``; an OSError that names the address."""
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on the distributed address {address}: {exc.strerror or exc}") from None
    return sock
