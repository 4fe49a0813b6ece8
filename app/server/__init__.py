"""The server API, MindSpore Serving's ``server`` module in shape.

    from mserve import server

    server.start_servables(server.ServableStartConfig("servables", "add"))
    server.start_restful_server("127.0.0.1:5500")
    ...
    server.stop()

``start_*`` return once the servables are loaded and warm, and the socket listens;
the server runs in background threads until `stop`. As with MindSpore Serving, a
start script may simply end after ``start_restful_server`` or ``start_grpc_server``:
the process keeps serving until SIGINT or SIGTERM, then stops gracefully and exits 0
(`mserve.lifetime`).

`ServableStartConfig` takes MindSpore Serving's parameters, in its order, with its
defaults and checks (``RuntimeError`` with ``Parameter '...'`` messages).

mserve additions (operability):

* Readiness: `readiness` (``GET /ready``) is true only once every configured
  servable is loaded and warm, and false again from the first moment of `stop`. Call
  `start_restful_server` first and `start_servables` second to answer ``/health``
  (200) and ``/ready`` (503) while models load; predicts meanwhile get 503.
* Hot reload: ``start_servables(..., poll_interval=2.0)`` watches the version
  folders (see `mserve.serving.reload`); off by default.
* Graceful stop: ``stop(drain_timeout, grace)``: ``/ready`` turns 503 at once, new
  requests are still served for ``grace`` seconds (so load balancers notice), then
  the listener closes and in-flight requests finish, up to ``drain_timeout``.
* Metrics: batch and model hooks go to `mserve.ops.metrics` (``GET /metrics``).

Processes (see `mserve.devices` and README "Processes: front-ends and device
processes"): by default `start_servables` starts one device process per device,
which alone loads and runs the models, and `start_restful_server` starts
``workers`` front-end processes on the port (default `default_workers`: one per
CPU core, 1 to 8; ``MSERVE_WORKERS`` overrides it), which do HTTP, JSON and the
Python stages and send model calls to the device processes; `start_grpc_server`
starts front-ends of its own for gRPC, all on one port with SO_REUSEPORT.
``use_processes("single")`` (or ``MSERVE_PROCESSES=single``) keeps everything in
this process instead, as the tests do.

This module is the face: its functions are those of one default
`mserve.runtime.runtime.Runtime` (`default_runtime`), which owns the registry, the
listeners, the device processes and the lifecycle. The front-end and device
processes build runtimes of their own (`mserve.runtime.frontend_role`,
`mserve.runtime.device_role`).
"""

from __future__ import annotations

from .. import lifetime
from ..runtime.config import (
    DEVICE_TYPES, ServableStartConfig, SSLConfig, merge_configs, script_relative, validate_device_type,
)
from ..runtime.listeners import RestfulServer
from ..runtime.loading import resolve_devices
from ..runtime.processes import MAX_DEFAULT_WORKERS, PROCESS_MODES, default_workers
from ..runtime.runtime import Runtime
from ..serving.servable import ServableRegistry
from . import master, register  # MindSpore's server.master and server.register

__all__ = [
    # MindSpore Serving's server API
    "ServableStartConfig", "SSLConfig", "start_servables", "start_restful_server", "start_grpc_server", "stop",
    "master", "register",
    # mserve additions
    "registry", "readiness", "use_processes", "processes", "start_health_server", "begin_shutdown",
    "default_workers", "default_runtime", "resolve_devices", "merge_configs", "validate_device_type",
    "script_relative", "RestfulServer", "Runtime", "DEVICE_TYPES", "PROCESS_MODES", "MAX_DEFAULT_WORKERS",
]

# The runtime of this process's start script: created once, emptied again by `stop`.
_runtime = Runtime()
# MindSpore Serving's process outlives its script only while servables run (mserve.lifetime).
lifetime.serve_while(_runtime.serves_something)


def default_runtime() -> Runtime:
    """The runtime this module's functions act on (its transports, handlers and device
    supervisor, for tools and tests)."""
    return _runtime


def registry() -> ServableRegistry:
    """The servables this process serves (for tools and tests)."""
    return _runtime.registry


def readiness() -> tuple[bool, str]:
    """(ready, reason): what ``GET /ready`` answers (200 when ready, else 503)."""
    return _runtime.readiness()


def processes() -> str:
    """The process mode `start_servables` and `start_restful_server` use now."""
    return _runtime.processes()


# The lifecycle: the default runtime's own methods (their signatures and docs are
# MindSpore Serving's, plus mserve's additions; see mserve.runtime).
start_servables = _runtime.start_servables
start_restful_server = _runtime.start_restful_server
start_grpc_server = _runtime.start_grpc_server
start_health_server = _runtime.start_health_server
use_processes = _runtime.use_processes
begin_shutdown = _runtime.begin_shutdown
stop = _runtime.stop
