"""MindSpore Serving's rules for where and how often a server listens.

A start script written for MindSpore Serving expects its checks and texts: a RESTful
address is ``ip:port`` (no ``unix:`` socket), a bad one or one that cannot be bound
raises ``RuntimeError("Serving Error: ...")``, and a process runs one RESTful server
and one gRPC server at most (a second start raises ``... is already running``).
mserve adds port 0 (a free port) and says why a bind failed after MindSpore's text.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

log = logging.getLogger("mserve.server")

RESTFUL = "RESTful server"
GRPC = "Serving gRPC server"


def check_restful_address(address: object) -> tuple[str, int]:
    """``(host, port)`` of a RESTful ``ip:port`` address, checked as MindSpore does
    (``[v6]:port`` too; port 0 picks a free port)."""
    if not isinstance(address, str):
        raise RuntimeError(f"Parameter 'address' should be str, but actually {type(address)}")
    if address.startswith("unix:"):
        raise RuntimeError("Serving Error: RESTful server does not support binding to unix domain socket")
    position = address.rfind(":")
    if position < 0:
        raise RuntimeError(f"Serving Error: The format of the {RESTFUL} address '{address}' is illegal")
    if position == 0 or position == len(address) - 1:
        raise RuntimeError(f"Serving Error: Missing ip or port of the {RESTFUL} address '{address}'")
    host, port_text = address[:position], address[position + 1:]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise RuntimeError(f"Serving Error: The type of {RESTFUL} address '{address}' port is not a number") from None
    if not 0 <= port <= 65535:
        raise RuntimeError(f"Serving Error: The port of the {RESTFUL} address '{address}' is out of legal range "
                           f"[1 ~ 65535]")
    return host, port


def bind_restful(address: str, host: str, port: int, bind: Callable[[str, int], socket.socket]) -> socket.socket:
    """``bind(host, port)``, failing with MindSpore's text and the reason after it."""
    try:
        return bind(host, port)
    except (OSError, RuntimeError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RuntimeError(
            f"Serving Error: RESTful server start failed, bind to the socket address {address} failed: {reason}"
        ) from None


class ListenerSlots:
    """Which of MindSpore's one-per-process servers (`RESTFUL`, `GRPC`) run now."""

    def __init__(self) -> None:
        self._running: set[str] = set()

    def check_free(self, kind: str) -> None:
        if kind in self._running:
            log.error("Serving Error: %s is already running", kind)  # MindSpore logs it too
            raise RuntimeError(f"Serving Error: {kind} is already running")

    def taken(self, kind: str) -> None:
        self._running.add(kind)

    def release_all(self) -> None:
        self._running.clear()


def check_restful_tls(ssl_config: object, build: Callable[[object], object]) -> None:
    """Build the RESTful server's TLS context to check the files, failing as MindSpore
    does (``Serving Error: load private_key from ... failed``, mserve's reason after)."""
    try:
        build(ssl_config)
    except RuntimeError as exc:
        raise RuntimeError(f"Serving Error: {exc}") from None
