"""Progress of loading and warming up servables, for whoever shows it.

Loading a version reports what it is doing through `report`: which model file it
loads (and with which backend, on which devices), then each batch size it compiles
("bucket k of n"), then that the version is ready. The CLI listens (`listening`) and
shows a progress display on a terminal or one log line per step otherwise; the server
itself only reports. Listeners run on the loading thread and must be quick; one that
raises is logged and skipped, never failing the load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from ..backends import Device

log = logging.getLogger("mserve.serving.progress")


@dataclass(frozen=True)
class LoadProgress:
    """One step of loading a servable version.

    ``phase``: ``"loading"`` (reading a model file: ``model``, ``backend``,
    ``devices``), ``"compiling"`` (bucket ``step`` of ``total`` for ``model``,
    ``batch_size`` rows; ``None`` for a model without a batch dimension),
    or ``"ready"`` (the version is warm).
    """

    servable: str
    version: int
    phase: str
    model: str | None = None
    backend: str | None = None
    devices: tuple[str, ...] = ()
    step: int = 0
    total: int = 0
    batch_size: int | None = None


Listener = Callable[[LoadProgress], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(event: LoadProgress) -> None:
    """Tell every listener (loading goes on whatever they do)."""
    for listener in list(_listeners):
        try:
            listener(event)
        except Exception:  # a display must never fail a load
            log.exception("a progress listener failed")


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with every `LoadProgress` reported inside the block."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def device_name(device: object) -> str:
    """``cpu:0``, ``cuda:1`` for JAX devices; ``ascend:0`` for a plugin's (type, id)."""
    if isinstance(device, Device):
        return str(device)
    if isinstance(device, tuple) and len(device) == 2:
        return f"{device[0]}:{device[1]}"
    platform = getattr(device, "platform", None)
    ident = getattr(device, "id", None)
    if platform is not None and ident is not None:
        return f"{platform}:{ident}"
    return str(device)
