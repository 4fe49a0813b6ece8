"""The runtime: what one process serves and how, as one object.

A `Runtime` owns the registry of loaded servables, the listeners (REST, gRPC,
health port, front-end pools), the device supervisor (devices mode) or the
registry's follower, readiness, and the lifecycle: `start_servables`, the
``start_*_server`` listeners, hot reload, `begin_shutdown` and `stop`. Each process
role builds its own: `mserve.server` keeps a default one (a start script's
process), and a front-end or device process builds one for itself
(`mserve.runtime.frontend_role`, `mserve.runtime.device_role`).

The lifecycle's steps live in the modules beside this one, as functions whose
first argument is the runtime; the class below makes them its methods.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import lifetime, rundir
from ..logsetup import ReadyLog
from ..ops import metrics
from ..serving.dataplane import Dataplane
from ..serving.reload import RequestEpochs, VersionWatcher
from ..serving.servable import ServableRegistry
from ..transport.listen_rules import ListenerSlots
from . import listeners
from . import loading as servable_loading
from . import processes as process_modes
from .loading import LoadedServable
from .processes import PROCESS_MODES

log = logging.getLogger("mserve.runtime")


@dataclass(eq=False, repr=False)  # one object per process: compared and hashed by identity
class Runtime:
    """One process's server. ``processes``: ``"devices"`` or ``"single"`` (None:
    ``MSERVE_PROCESSES``, else ``"devices"``); the rest starts empty and is filled
    by the lifecycle methods."""

    processes_mode: str | None = None  # "devices" or "single"; None: MSERVE_PROCESSES, else "devices"
    registry: ServableRegistry = field(default_factory=ServableRegistry)
    transports: list[Any] = field(default_factory=list)  # every listener, each with stop(drain_timeout)
    handlers: list[Dataplane] = field(default_factory=list)  # REST's PredictHandlers and gRPC's dataplanes
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Batch hooks: an object with ``bind(servable, version) -> BatchObserver`` gets one
    # observer per loaded version; a plain BatchObserver is shared by all.
    observer: Any = field(default_factory=metrics.MetricsObserver)
    configured: dict[str, LoadedServable] = field(default_factory=dict)  # servable name -> how it loaded
    loading: int = 0  # start_servables calls (or a front-end's wait for device processes) in progress
    stopping: bool = False
    epochs: RequestEpochs = field(default_factory=RequestEpochs)  # requests in flight, for retiring versions
    watcher: VersionWatcher | None = None
    observers: dict[int, Any] = field(default_factory=dict)  # id(LoadedVersion) -> its VersionObserver
    ready_listeners: list[Callable[[], None]] = field(default_factory=list)  # told when readiness may have changed
    devices: Any = None  # the DeviceSupervisor (devices mode)
    frontends: list[Any] = field(default_factory=list)  # front-end WorkerPools (devices mode)
    run_dir: str | None = None  # sockets, manifest and metrics of this server's processes
    # How hot reload retires a version (a device process first lets its front-ends switch).
    retire: Callable[[str, int], None] | None = None  # None: retire_version
    follower: Any = None  # devices mode: keeps the registry following the device processes
    listener_slots: ListenerSlots = field(default_factory=ListenerSlots)  # MindSpore: one RESTful, one gRPC server
    ready_log: ReadyLog = field(default_factory=ReadyLog)  # a start script's "ready" line (mserve.logsetup)
    # Parts of a servable outside this process (the hosts of a distributed servable,
    # mserve.distributed): () -> (ready, why), asked before anything else.
    readiness_probes: list[Callable[[], tuple[bool, str]]] = field(default_factory=list)
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)  # run once by stop(), after the drain
    # Devices mode: the settings of the distributed group that the device process of
    # the distributed model starts (mserve.distributed.serving.serve_over_hosts).
    distributed: dict[str, Any] | None = None
    starting: Any = None  # devices mode: the DeviceSupervisor while its processes load (cancel_start)

    # The lifecycle, from the modules beside this one.
    start_servables = servable_loading.start_servables
    retire_version = servable_loading.retire_version
    watch = servable_loading.watch
    start_devices = process_modes.start_devices
    start_restful_server = listeners.start_restful_server
    start_grpc_server = listeners.start_grpc_server
    start_health_server = listeners.start_health_server

    def add_readiness_probe(self, probe: Callable[[], tuple[bool, str]]) -> None:
        """Make ``/ready`` also ask ``probe()`` -> (ready, why)."""
        self.readiness_probes.append(probe)

    def remove_readiness_probe(self, probe: Callable[[], tuple[bool, str]]) -> None:
        if probe in self.readiness_probes:
            self.readiness_probes.remove(probe)

    def cancel_start(self) -> None:
        """Stop device processes that are still loading, from any thread (a stop
        asked while ``start_servables`` waits, say for the hosts of a distributed
        servable): ``start_servables`` then raises `ServableLoadError`."""
        starting = self.starting
        if starting is not None:
            starting.stop(drain_timeout=0)

    def on_stop(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` once when `stop` has drained the requests."""
        self.stop_hooks.append(hook)

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready once every configured servable serves a warm version."""
        if self.stopping:
            return False, "stopping"
        for probe in list(self.readiness_probes):  # a distributed group names the host it waits for
            ok, why = probe()
            if not ok:
                return False, why
        if self.loading:
            return False, "loading servables"
        if self.processes_started():  # devices mode: this process supervises, front-ends serve
            if self.devices is None:
                return False, "no servable loaded"
            down = self.devices.down()
            if down:
                return False, f"device process {', '.join(down)} is restarting"
            return True, "ready"
        if not self.configured:
            return False, "no servable loaded"
        served = self.registry.servables()
        missing = [name for name in self.configured if name not in served]
        if missing:
            return False, f"no version of servable {', '.join(missing)} is loaded"
        return True, "ready"

    def refresh_ready(self) -> None:
        """Tell the readiness gauge and the gRPC health services what `readiness` says now."""
        metrics.READY.set(1 if self.readiness()[0] else 0)
        for listener in list(self.ready_listeners):
            listener()

    def serves_something(self) -> bool:
        """Whether servables were started (or are starting): what keeps a start
        script's process alive after the script returns, as in MindSpore Serving."""
        return bool(self.configured) or self.devices is not None or self.loading > 0

    def log_if_ready(self) -> None:
        """Log the one ``ready`` line once servables are served and a port listens."""
        self.ready_log.check(self.readiness()[0], sorted(self.registry.servables()))

    def processes_started(self) -> bool:
        return self.devices is not None or bool(self.frontends)

    def failed_versions(self, name: str) -> list[dict[str, Any]]:
        """Versions hot reload could not load (they are skipped until they change)."""
        watcher = self.watcher
        if watcher is None:
            return []
        failures = list(watcher.failures.get(name, {}).values())
        return [{"version": f.version, "error": f.error} for f in sorted(failures, key=lambda f: f.version)]

    def use_processes(self, mode: str) -> None:
        """``"devices"``: models in device processes, HTTP in front-end processes (the
        default); ``"single"``: everything in this process. Call before `start_servables`."""
        if mode not in PROCESS_MODES:
            raise ValueError(f"processes must be one of {', '.join(PROCESS_MODES)}, got {mode!r}")
        self.processes_mode = mode

    def processes(self) -> str:
        """The process mode `start_servables` and `start_restful_server` use now."""
        if self.processes_mode is not None:
            return self.processes_mode
        return process_modes.mode_from_environment()

    def run_directory(self) -> str:
        """Sockets, manifest and metrics of this server's processes (made on first use)."""
        if self.run_dir is None:
            self.run_dir = rundir.create()  # and removes those of servers killed outright
        return self.run_dir

    def child_env(self) -> dict[str, str]:
        """The environment of device and front-end processes: one metrics directory
        for the whole server (any front-end's /metrics sums every process)."""
        env = dict(os.environ)
        if not metrics.multiprocess_dir():
            folder = os.path.join(self.run_directory(), "metrics")
            os.makedirs(folder, exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = folder
        return env

    def begin_shutdown(self) -> None:
        """Answer ``/ready`` with 503 from now on and stop hot reload; requests are
        still served. `stop` does this first; call it earlier (say, on a signal) to give
        load balancers a head start."""
        self.stopping = True
        self.refresh_ready()
        for pool in self.frontends:  # devices mode: the front-ends answer /ready
            pool.begin_shutdown()
        watcher = self.watcher
        if watcher is not None:
            watcher.stop()

    def stop(self, drain_timeout: float = 30.0, grace: float = 0.0) -> None:
        """Stop gracefully and unload: ``/ready`` answers 503 at once; new requests are
        still served for ``grace`` seconds; then the listeners close, new predicts get
        503, and in-flight requests finish (up to ``drain_timeout`` seconds)."""
        self.ready_log.reset()
        self.begin_shutdown()
        if grace > 0:
            time.sleep(grace)
        with self.lock:
            self.listener_slots.release_all()
            transports, self.transports = self.transports, []
            handlers, self.handlers = self.handlers, []
            stop_started = time.monotonic()
            # Side by side; each answers what it has received, then closes (mserve.lifetime).
            lifetime.stop_concurrently([t.stop for t in transports], drain_timeout)
            for handler in handlers:
                handler.draining = True
            self.ready_listeners.clear()
            self.frontends.clear()
            # Device processes after the front-ends: their calls in flight are done by now.
            if self.follower is not None:
                self.follower.stop()
                self.follower = None
            if self.devices is not None:
                # Idle by now: they get what is left of the drain (and a moment to exit).
                self.devices.stop(max(drain_timeout - (time.monotonic() - stop_started), 0.0))
                self.devices = None
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None
            self.watcher = None
            self.registry.clear()
            hooks, self.stop_hooks = self.stop_hooks, []
            for hook in hooks:
                try:
                    hook()
                except Exception:  # one failing hook must not keep the others from running
                    log.exception("a stop hook failed")
            for observer in self.observers.values():
                observer.detach()
            self.observers.clear()
            self.configured.clear()
            self.processes_mode = None  # use_processes holds for one server's lifetime
            self.distributed = None  # so does serve_over_hosts
            self.stopping = False
            self.refresh_ready()
        lifetime.release()
