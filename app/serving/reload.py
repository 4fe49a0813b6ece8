"""Hot reload: version folders that come and go while the server runs.

`VersionWatcher` looks at each watched servable's folder every ``poll_interval``
seconds and makes the loaded versions follow the folders, under the same policy as
at start (`ServableStartConfig.version_number`):

* ``0`` (the default, "newest"): the newest version folder is served. A new, higher
  folder is loaded and warmed up in the background while the current version keeps
  serving; once warm it is added to the registry (it becomes the latest in one
  step), and the version it replaces is retired. Removing the newest folder rolls
  back the same way to the next one down.
* explicit numbers: those versions are served while their folders exist.

A new folder is loaded only once its files have stopped changing for one poll
(copying a model in is not mistaken for a broken version); renaming a finished
folder into place is the safe way. A version that fails to load is logged, counted
(``mserve_version_loads_total{outcome="failed"}``), shown under ``failed_versions``
in ``GET /model/{name}``, and skipped until its files change; whatever served before
keeps serving. Retiring a version takes it out of the registry first (no new request
can find it), then waits for every request that started before that moment
(`RequestEpochs`), then closes it. A servable left with no version folder at all is
unloaded, and ``/ready`` answers 503 until a version is back.

Only version folders are watched: ``servable_config.py`` is read once, at start.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .servable import ServableRegistry, list_versions

log = logging.getLogger("mserve.serving.reload")


class RequestEpochs:
    """Which requests started before a given moment are still running.

    Each predict request `enter`s the current epoch and `leave`s it when answered;
    `wait_for_earlier` starts a new epoch and waits until the requests of all earlier
    epochs are done. Requests that started afterwards are not waited for."""

    def __init__(self) -> None:
        # enter/leave (the request path) take the bare lock, cheaper than the Condition.
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._epoch = 0
        self._counts: dict[int, int] = {0: 0}

    def enter(self) -> int:
        with self._lock:
            epoch = self._epoch
            self._counts[epoch] += 1
        return epoch

    def leave(self, epoch: int) -> None:
        with self._lock:
            left = self._counts[epoch] - 1
            if left or epoch == self._epoch:
                self._counts[epoch] = left
            else:
                del self._counts[epoch]
                self._cv.notify_all()

    def wait_for_earlier(self, timeout: float) -> bool:
        """Wait for the requests running now to finish; False on timeout."""
        with self._cv:
            old = self._epoch
            self._epoch += 1
            self._counts[self._epoch] = 0
            for epoch in [e for e, n in self._counts.items() if e <= old and not n]:
                del self._counts[epoch]
            return self._cv.wait_for(lambda: not any(e <= old for e in self._counts), timeout)


@dataclass
class WatchTarget:
    """One servable to watch: its folder and which versions it wants."""

    name: str
    folder: Path
    pinned: set[int] = field(default_factory=set)
    newest: bool = True


@dataclass
class LoadFailure:
    version: int
    signature: tuple
    error: str


def folder_signature(folder: Path) -> tuple:
    """What the folder holds, as (relative path, size, mtime) of every file."""
    entries = []
    try:
        for path in sorted(folder.rglob("*")):
            try:
                if path.is_file():
                    st = path.stat()
                    entries.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
            except OSError:
                entries.append((str(path), -1, -1))
    except OSError:
        return ("<unreadable>",)
    return tuple(entries)


def _present(folder: Path) -> list[int]:
    try:
        return list_versions(folder)
    except OSError:
        return []


class VersionWatcher:
    """Polls version folders and loads/retires versions to follow them.

    ``load(name, version)`` returns a warm `LoadedVersion` or raises; ``retire(name,
    version)`` takes one out of service (waiting for its requests) and closes it.
    """

    def __init__(
        self,
        targets: list[WatchTarget],
        registry: ServableRegistry,
        load: Callable[[str, int], Any],
        add: Callable[[str, Any], None],
        retire: Callable[[str, int], None],
        poll_interval: float,
        on_change: Callable[[], None] = lambda: None,
    ):
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval}")
        self.targets = {t.name: t for t in targets}
        self.registry = registry
        self._load = load
        self._add = add
        self._retire = retire
        self._on_change = on_change
        self.poll_interval = poll_interval
        self.failures: dict[str, dict[int, LoadFailure]] = {t.name: {} for t in targets}
        # Folders present now count as settled at the first poll.
        self._signatures: dict[str, dict[int, tuple]] = {
            t.name: {v: folder_signature(t.folder / str(v)) for v in _present(t.folder)} for t in targets
        }
        self._lock = threading.Lock()
        self._stopped = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mserve-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop polling; a load in progress is closed instead of served."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _run(self) -> None:
        while not self._wake.wait(self.poll_interval):
            try:
                self.poll()
            except Exception:  # keep watching whatever went wrong this round
                log.exception("hot reload: polling the version folders failed")

    def poll(self) -> None:
        """One round over every watched servable."""
        for target in self.targets.values():
            if self._stopped:
                return
            self._poll(target)

    def _poll(self, target: WatchTarget) -> None:
        present = _present(target.folder)
        before = self._signatures.get(target.name, {})
        now = {v: folder_signature(target.folder / str(v)) for v in present}
        self._signatures[target.name] = now
        settled = {v for v in present if before.get(v) == now[v]}
        failures = self.failures[target.name]
        for v in list(failures):
            if v not in now or failures[v].signature != now[v]:
                del failures[v]  # gone, or changed: worth another try

        servable = self.registry.servables().get(target.name)
        loaded = set(servable.versions) if servable is not None else set()
        keep = {v for v in loaded if v in target.pinned and v in now}
        undecided = False

        for v in sorted(target.pinned & set(now) - loaded):
            if v in settled and v not in failures and self._try_load(target, v, now[v]):
                keep.add(v)

        if target.newest:
            chosen = None
            for v in sorted(present, reverse=True):
                if v in loaded:
                    chosen = v
                    break
                if v not in settled:
                    undecided = True  # still being written: decide next round
                    break
                if v in failures:
                    continue
                if self._try_load(target, v, now[v]):
                    chosen = v
                    break
            if chosen is not None:
                keep.add(chosen)

        if undecided or self._stopped:
            return
        for v in sorted(loaded - keep):
            log.info("hot reload: retiring servable %s version %d", target.name, v)
            self._retire(target.name, v)
            self._on_change()
        if not keep and loaded:
            log.warning("hot reload: servable %s has no version folder left; it is unloaded", target.name)

    def _try_load(self, target: WatchTarget, version: int, signature: tuple) -> bool:
        log.info("hot reload: loading servable %s version %d", target.name, version)
        try:
            loaded = self._load(target.name, version)
        except Exception as exc:
            if self._stopped:  # the server stopped under the load; not the version's fault
                return False
            self.failures[target.name][version] = LoadFailure(version, signature, str(exc))
            log.error("hot reload: servable %s version %d failed to load, still serving what was served: %s",
                      target.name, version, exc)
            return False
        with self._lock:
            if self._stopped:
                loaded.close()
                return False
            self._add(target.name, loaded)
        log.info("hot reload: servable %s version %d is serving", target.name, version)
        self._on_change()
        return True
