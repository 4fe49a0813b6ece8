"""Which processes serve: the process modes (``"devices"``: models in device
processes, HTTP and gRPC in front-end processes; ``"single"``: all in one), how
many front-ends by default, and starting the device processes of a runtime (whose
registry then follows what they serve, as each front-end's does).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import ServableStartConfig

PROCESS_MODES = ("devices", "single")


def mode_from_environment() -> str:
    """``MSERVE_PROCESSES``, else ``"devices"``."""
    mode = os.environ.get("MSERVE_PROCESSES", "devices").strip().lower() or "devices"
    if mode not in PROCESS_MODES:
        raise RuntimeError(f"MSERVE_PROCESSES must be one of {', '.join(PROCESS_MODES)}, got {mode!r}")
    return mode


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Front-end processes when none is asked for: ``MSERVE_WORKERS``, else one per
    CPU core this process may use, at least 1 and at most 8. Measured on 2 cores
    (docs/performance.md): two front-ends served the add servable at 1.7-1.9x the
    req/s of one, for the same CPU per request; the device process, idle while small
    models run on the front-ends' own copies, shares the cores with them otherwise.
    Past 8, HTTP is rarely the limit and each front-end costs memory."""
    raw = os.environ.get("MSERVE_WORKERS")
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise RuntimeError(f"MSERVE_WORKERS must be a whole number, got {raw!r}") from None
        if value < 1:
            raise RuntimeError(f"MSERVE_WORKERS must be at least 1, got {value}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def default_grpc_workers(tls: bool = False) -> int:
    """gRPC front-end processes when none is asked for: ``MSERVE_WORKERS``, else, for
    mserve's own gRPC server (plain TCP), one per two cores, at least 1: each is a
    single event loop that answers quick predicts itself, so it keeps one core busy
    and no more. Measured on 2 cores (docs/performance.md), one such front-end
    served more calls per second than two, at less CPU per call, beside its clients.
    TLS gRPC runs on grpcio's thread pool: one per core, as `default_workers`."""
    workers = default_workers()
    if tls or os.environ.get("MSERVE_WORKERS"):
        return workers
    return max(1, workers // 2)


def start_devices(runtime: Any, configs: list[ServableStartConfig], poll_interval: float | None) -> None:
    """Devices mode: a device process per device loads the servables; front-ends
    already started pick them up from the manifest."""
    from ..devices.supervisor import DeviceSupervisor

    with runtime.lock:
        if runtime.devices is not None:
            raise RuntimeError(
                "start_servables was already called: with device processes, pass every servable in one call "
                "(or call stop() first)"
            )
        supervisor = DeviceSupervisor(
            configs, runtime.run_directory(), log_level=logging.getLogger("mserve").getEffectiveLevel(),
            poll_interval=poll_interval or None, env=runtime.child_env(), distributed=runtime.distributed,
        )
        runtime.loading += 1
        try:
            if runtime.distributed is not None:  # /ready names the hosts the device process waits for
                from ..distributed.status import follow_status

                follow_status(runtime, runtime.run_directory())
            runtime.starting = supervisor
            supervisor.start()
            runtime.devices = supervisor
            follow_devices(runtime, supervisor)
            for pool in runtime.frontends:  # ready once every front-end serves them
                pool.wait_loaded()
        finally:
            runtime.starting = None
            runtime.loading -= 1


def follow_devices(runtime: Any, supervisor: Any) -> None:
    """This process's registry mirrors what the device processes serve (as each
    front-end's does), so `registry`, the health port's ``/ready`` and tools see the
    servables, and Model calls from here would reach the device processes too."""
    from ..devices.frontend import FrontendModels
    from ..devices.manifest import Follower

    follower = Follower(supervisor.manifest_path, FrontendModels(runtime, "supervisor", copies=False).apply, interval=0.5)
    follower.poll()
    follower.start()
    runtime.follower = follower
