"""The front-end process role: ``python -m mserve.runtime.frontend_role``, one of
the processes of a `mserve.transport.workers.WorkerPool`, with its settings as JSON
on stdin.

It builds a single-process `Runtime` of its own. With a ``manifest`` (devices mode)
it is a front-end: it serves its ports at once (``/ready`` 503 while the device
processes load), then follows the manifest, its registry holding stand-in model
stages that call the device processes. Without one it is a whole server: it loads
every servable itself. It reports ``LISTENING``, ``READY <json>`` or ``FAILED`` on
stdout for the pool; SIGUSR1 begins shutdown (``/ready`` 503, requests still
served); the pool's ``STOP <seconds>`` on stdin (or a SIGTERM) stops it gracefully
within that drain timeout; SIGINT is ignored (Ctrl+C reaches the whole process
group: the pool decides how its workers stop).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from .. import logsetup
from ..lifetime import exit_at_once, ignore_sigint
from ..ops.access_log import deferred as deferred_access_records
from ..ops.batched_log import BatchedStreamHandler
from ..transport.balance import ConnectionBalance
from ..transport.workers import PoolOrders
from .config import ServableStartConfig, SSLConfig
from .runtime import Runtime


def main() -> int:
    # Block the stop signals first, so one that comes while loading is held until
    # the worker serves and then drains like any other stop.
    # (SIGUSR1: a front-end's "begin shutdown", answered by /ready 503 while serving on.)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    ignore_sigint()  # the pool stops its workers (see the module docstring)
    from ..devices.process import die_with_parent

    die_with_parent()  # a pool's process killed outright leaves no worker behind
    settings = json.loads(sys.stdin.readline())
    orders = PoolOrders()
    role = "front-end" if settings.get("manifest") else "worker"
    handler = logging.StreamHandler()
    handler.setFormatter(logsetup.formatter(f"{role} {settings['index']}, pid {os.getpid()}"))  # one format (mserve.logsetup)
    mserve_log = logging.getLogger("mserve")
    mserve_log.addHandler(handler)
    mserve_log.setLevel(settings["log_level"])
    waitress_log = logging.getLogger("waitress")  # its warnings (e.g. task queue depth) at the same level
    waitress_log.addHandler(handler)
    waitress_log.setLevel(max(settings["log_level"], logging.WARNING))
    waitress_log.propagate = False
    access = logging.getLogger("mserve.access")  # one plain line per request, as `mserve start` prints it
    access_handler = BatchedStreamHandler()  # written in batches by a thread of its own, off the request path
    access_handler.setFormatter(logsetup.access_formatter())
    access.handlers = [access_handler]
    access.propagate = False
    # Probes (/health, /ready, /metrics) log at DEBUG: shown with --log-level debug.
    access.setLevel(min(settings["log_level"], logging.INFO) if settings.get("access_log", True) else logging.WARNING)
    deferred_access_records.enable()  # records made and written off the request path
    from ..errors import ServableLoadError
    from ..ops.metadata import describe_servable

    sock = socket.socket(fileno=settings["fd"]) if settings["fd"] is not None else None
    balance_fd = settings.get("balance_fd")
    balance = (
        ConnectionBalance(balance_fd, settings["workers"], settings["index"], settings.get("bells", ()))
        if balance_fd is not None else None
    )
    runtime = Runtime(processes_mode="single")  # this process is one of the server's front-ends or workers
    runtime.ready_log.quiet()  # the server that started this process says when it is ready
    ssl = settings["ssl_config"]
    if settings.get("manifest"):
        return _frontend(runtime, settings, sock, balance, orders)
    try:
        runtime.start_servables(
            [ServableStartConfig(**c) for c in settings["configs"]], poll_interval=settings.get("poll_interval")
        )
        if balance is not None:
            balance.serving = True
        runtime.start_restful_server(
            sock=sock, ssl_config=SSLConfig(**ssl) if ssl else None, balance=balance, **settings["restful"]
        )
        if settings.get("grpc"):
            runtime.start_grpc_server(ssl_config=SSLConfig(**ssl) if ssl else None, **settings["grpc"])
    except (ServableLoadError, RuntimeError) as exc:
        print("FAILED " + str(exc).replace("\n", " "), flush=True)
        return 1
    described = [describe_servable(s) for s in runtime.registry.servables().values()]
    print("READY " + json.dumps(described), flush=True)
    signal.sigwait({signal.SIGTERM})
    runtime.stop(drain_timeout=orders.drain_timeout)
    deferred_access_records.disable()  # the queued access records go to their handler (os._exit runs no atexit)
    exit_at_once(0)  # the pool counts this process's exit against the drain timeout
    return 0


def _frontend(
    runtime: Runtime,
    settings: dict[str, Any],
    sock: socket.socket | None,
    balance: ConnectionBalance | None,
    orders: PoolOrders,
) -> int:
    """A front-end: serve the port at once (``/ready`` 503 while loading), then the
    servables of the manifest, following it (device restarts, hot reload). Its
    ports: REST on ``sock`` (None: none), gRPC per the ``grpc`` settings (health
    NOT_SERVING while loading)."""
    from ..devices.frontend import FrontendModels
    from ..devices.manifest import Follower
    from ..errors import ServableLoadError
    from ..ops.metadata import describe_servable

    from ..distributed.status import follow_status

    ssl = settings["ssl_config"]
    runtime.loading += 1  # until the device processes serve
    # A distributed servable's device process says which hosts it waits for.
    follow_status(runtime, os.path.dirname(settings["manifest"]))
    runtime.refresh_ready()
    try:
        if sock is not None:
            runtime.start_restful_server(
                sock=sock, ssl_config=SSLConfig(**ssl) if ssl else None, balance=balance, **settings["restful"]
            )
        if settings.get("grpc"):
            runtime.start_grpc_server(ssl_config=SSLConfig(**ssl) if ssl else None, **settings["grpc"])
    except RuntimeError as exc:
        print("FAILED " + str(exc).replace("\n", " "), flush=True)
        return 1
    print("LISTENING", flush=True)
    # Device processes tag rows by sender (batch metrics); a gRPC pool's indices repeat REST's.
    models = FrontendModels(runtime, settings["index"] if sock is not None else f"grpc-{settings['index']}")
    follower = Follower(settings["manifest"], models.apply)
    stop_signals = {signal.SIGTERM}
    try:
        while not follower.poll():
            if signal.sigtimedwait(stop_signals, 0.05) is not None:
                runtime.stop(drain_timeout=0)
                return 0
    except ServableLoadError as exc:
        print("FAILED " + str(exc).replace("\n", " "), flush=True)
        return 1
    runtime.loading -= 1
    runtime.refresh_ready()
    if balance is not None:
        balance.serving = True  # new clients come here now, not to a front-end still loading
    follower.start()
    described = [describe_servable(s) for s in runtime.registry.servables().values()]
    print("READY " + json.dumps(described), flush=True)
    while signal.sigwait(stop_signals | {signal.SIGUSR1}) == signal.SIGUSR1:
        runtime.begin_shutdown()  # the server is about to stop: /ready 503, requests still served
    follower.stop()
    runtime.stop(drain_timeout=orders.drain_timeout)
    deferred_access_records.disable()  # the queued access records go to their handler (os._exit runs no atexit)
    exit_at_once(0)  # the pool counts this process's exit against the drain timeout
    return 0


if __name__ == "__main__":
    sys.exit(main())
