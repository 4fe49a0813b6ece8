"""A distributed group's readiness, shared with the server's other processes.

In the default process mode the group lives in the device process that serves the
distributed model, while ``/ready``, gRPC health and ``mserve_ready`` are answered by
the front-end processes (and the supervising process's health port). The device
process writes the group's readiness to ``distributed.json`` in the server's run
directory whenever it changes (`StatusWriter`); the other processes follow that file
(`StatusFollower`), so their ``/ready`` names a missing host within a fraction of a
second and turns 200 when the group serves, with no round trip per probe.

Predicts need no such file: a batch the group cannot run fails in the device
process with 503 and the reason, which the front-end answers as it is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from ..rundir import ReplacedFile

FILE_NAME = "distributed.json"
log = logging.getLogger("mserve.distributed")


def status_path(run_directory: str | os.PathLike) -> Path:
    return Path(run_directory) / FILE_NAME


class StatusWriter:
    """Writes ``readiness()`` -> (ready, why) to ``path`` whenever it changes."""

    def __init__(self, readiness: Callable[[], tuple[bool, str]], path: str | os.PathLike, interval: float = 0.1):
        self.readiness = readiness
        self.path = Path(path)
        self.interval = interval
        self._last: tuple[bool, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write_now(self) -> None:
        state = self.readiness()
        if state == self._last:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"ready": bool(state[0]), "reason": state[1], "pid": os.getpid()}))
        os.replace(tmp, self.path)
        self._last = state

    def start(self) -> "StatusWriter":
        self.write_now()
        self._thread = threading.Thread(target=self._run, name="mserve-distributed-status", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write_now()
            except OSError as exc:  # the run directory went (the server is stopping)
                log.debug("cannot write %s: %s", self.path, exc)

    def stop(self, reason: str = "the device process serving it stopped") -> None:
        """Stop following; the file then says the group is gone, with ``reason``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        self.readiness = lambda: (False, f"distributed servable: {reason}")
        try:
            self.write_now()
        except OSError:
            pass


class StatusFollower:
    """What the device process last wrote to ``path``, as a readiness probe
    (``readiness``); ``on_change()`` is called when it changes. No file: ready as far
    as the group goes (a server without one, or the device process not yet started)."""

    def __init__(self, path: str | os.PathLike, on_change: Callable[[], None] | None = None, interval: float = 0.2):
        self.path = Path(path)
        self.on_change = on_change
        self.interval = interval
        self._state: tuple[bool, str] = (True, "ready")
        self._file = ReplacedFile(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def readiness(self) -> tuple[bool, str]:
        return self._state

    def poll(self) -> bool:
        """Read the file if it changed; whether the readiness changed."""
        try:
            data = self._file.read_if_new(lambda path: json.loads(path.read_text()))
        except (OSError, ValueError):
            return False
        if data is None:
            return False
        state = (bool(data.get("ready")), str(data.get("reason", "")))
        if state == self._state:
            return False
        self._state = state
        return True

    def start(self) -> "StatusFollower":
        self.poll()
        self._thread = threading.Thread(target=self._run, name="mserve-distributed-status", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.poll() and self.on_change is not None:
                try:
                    self.on_change()
                except Exception:
                    log.exception("telling readiness listeners failed")

    def stop(self) -> None:
        self._stop.set()


def follow_status(runtime: Any, run_directory: str | os.PathLike) -> StatusFollower:
    """Make ``runtime``'s ``/ready`` (and gauges, gRPC health) follow the group's
    readiness as written in ``run_directory``; undone when the runtime stops."""
    follower = StatusFollower(status_path(run_directory), runtime.refresh_ready).start()
    runtime.add_readiness_probe(follower.readiness)

    def unfollow() -> None:
        follower.stop()
        runtime.remove_readiness_probe(follower.readiness)

    runtime.on_stop(unfollow)
    return follower
