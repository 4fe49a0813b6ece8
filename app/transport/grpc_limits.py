"""What one gRPC server process lets clients hold, and a log line when they hit it.

grpcio enforces the limits itself (server options): connections beyond
``max_connections`` are refused, a connection without a call for ``idle_timeout``
gets a GOAWAY, one connection carries at most ``max_streams_per_connection`` calls
at once (so one client opening thousands of streams that never read cannot starve
the others), and calls beyond ``max_calls`` in the process get RESOURCE_EXHAUSTED.
grpcio says nothing when it applies them, so `ConnectionWatch` counts this
process's open sockets and calls twice a second and logs a warning (at most every
10 s) while either is at its limit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("mserve.transport.grpc")

_WATCH_SECONDS = 0.5
_LOG_EVERY = 10.0


@dataclass(frozen=True)
class GrpcLimits:
    """``max_connections``: open connections per process (None: 10,000, or what the
    descriptor limit allows); ``idle_timeout``: seconds without a call before a
    connection is closed; ``max_streams_per_connection``: calls at once on one
    connection; ``max_calls``: calls at once in the process (running or waiting for
    a thread)."""

    max_connections: int | None = None
    idle_timeout: float = 60.0
    max_streams_per_connection: int = 100
    max_calls: int = 10000

    def check(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise RuntimeError(f"max_connections must be at least 1, got {self.max_connections}")
        if self.idle_timeout <= 0:
            raise RuntimeError(f"idle_timeout must be > 0 seconds, got {self.idle_timeout}")
        for name in ("max_streams_per_connection", "max_calls"):
            if getattr(self, name) < 1:
                raise RuntimeError(f"{name} must be at least 1, got {getattr(self, name)}")


class ConnectionWatch:
    """Logs when this process holds ``max_connections`` sockets or ``max_calls`` calls."""

    def __init__(self, max_connections: int, max_calls: int, calls: Callable[[], int]):
        self.max_connections = max_connections
        self.max_calls = max_calls
        self.calls = calls  # calls in progress now
        self._stop = threading.Event()
        self._last_log = -_LOG_EVERY

    def start(self) -> None:
        threading.Thread(target=self._run, name="mserve-grpc-limits", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(_WATCH_SECONDS):
            sockets = open_sockets()
            full = []
            if sockets >= self.max_connections:
                full.append(f"{sockets} sockets open, max_connections {self.max_connections}: new connections "
                            "are refused")
            calls = self.calls()
            if calls >= self.max_calls:
                full.append(f"{calls} calls in progress, max_calls {self.max_calls}: new calls get "
                            "RESOURCE_EXHAUSTED")
            now = time.monotonic()
            if full and now - self._last_log >= _LOG_EVERY:
                self._last_log = now
                log.warning("gRPC limit reached: %s", "; ".join(full))


def open_sockets() -> int:
    """Sockets this process holds (Linux; 0 elsewhere)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    count = 0
    for name in names:
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count
