"""Front-end processes serving a runtime's ports in devices mode: a RESTful port
bound here and inherited by ``workers`` processes, or a gRPC port that each of its
processes binds with SO_REUSEPORT (this process holds it meanwhile). Either kind
follows the device processes' manifest in this runtime's run directory.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from .. import lifetime
from ..transport.http import bind_socket, parse_address
from ..transport.listen_rules import bind_restful, check_restful_tls
from .config import SSLConfig
from .processes import default_grpc_workers, default_workers

log = logging.getLogger("mserve.server")


class FrontendListener:
    """The front-end processes of one RESTful server, as `listeners.RestfulServer` sees them."""

    def __init__(self, pool: Any, scheme: str):
        self.pool = pool
        self.scheme = scheme
        self.port = pool.sock.getsockname()[1]

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.pool.stop(drain_timeout)


def start_frontends(
    runtime: Any,
    address: str, ssl_config: SSLConfig | None, restful: dict[str, Any], workers: int | None
) -> FrontendListener:
    """Devices mode: bind ``address`` here, serve it from ``workers`` front-end
    processes (`mserve.transport.workers`)."""
    from ..transport.workers import WorkerPool
    from ..devices.manifest import FILE_NAME

    count = default_workers() if workers is None else workers
    if not isinstance(count, int) or count < 1:
        raise RuntimeError(f"workers must be a whole number >= 1, got {workers!r}")
    host, port = parse_address(address)
    if ssl_config is not None:
        from ..transport.https import build_ssl_context

        check_restful_tls(ssl_config, build_ssl_context)  # bad files fail here, before the port is taken
    with runtime.lock:
        sock = bind_restful(address, host, port, bind_socket)
        pool = WorkerPool(
            [], sock, count, restful=restful, ssl_config=ssl_config,
            log_level=logging.getLogger("mserve").getEffectiveLevel(),
            manifest=os.path.join(runtime.run_directory(), FILE_NAME), env=runtime.child_env(),
            access_log=logging.getLogger("mserve.access").isEnabledFor(logging.INFO),
        )
        pool.start(loaded=runtime.devices is not None)
        frontends = FrontendListener(pool, "https" if ssl_config is not None else "http")
        runtime.frontends.append(pool)
        runtime.transports.append(frontends)
        lifetime.keep_serving(runtime.stop)
    return frontends


class GrpcFrontendListener:
    """The front-end processes serving one gRPC address (devices mode), as the caller
    of `start_grpc_server` sees them: ``target``, ``port``, ``stop``."""

    scheme = "grpc"

    def __init__(self, pool: Any, holder: socket.socket, target: str):
        self.pool = pool
        self.holder = holder  # keeps the port ours while front-ends come and go
        self.target = target
        self.port = int(target.rpartition(":")[2])

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.pool.stop(drain_timeout)
        self.holder.close()


def start_grpc_frontends(
    runtime: Any,
    address: str, ssl_config: SSLConfig | None, grpc: dict[str, Any], reuse_port: bool, workers: int | None
) -> GrpcFrontendListener:
    """Devices mode: ``workers`` front-end processes serving gRPC only, each binding
    ``address`` with SO_REUSEPORT; this process holds the port (checked free) meanwhile."""
    from ..transport.grpc import reserve_port, server_credentials
    from ..transport.workers import WorkerPool
    from ..devices.manifest import FILE_NAME

    count = default_grpc_workers(ssl_config is not None) if workers is None else workers
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RuntimeError(f"workers must be a whole number >= 1, got {workers!r}")
    if ssl_config is not None:
        server_credentials(ssl_config, address)  # bad certificate files fail here, before any process starts
    with runtime.lock:
        holder, target = reserve_port(address, shared=reuse_port)
        try:
            pool = WorkerPool(
                [], None, count, ssl_config=ssl_config, log_level=logging.getLogger("mserve").getEffectiveLevel(),
                manifest=os.path.join(runtime.run_directory(), FILE_NAME), env=runtime.child_env(),
                access_log=logging.getLogger("mserve.access").isEnabledFor(logging.INFO),
                grpc={**grpc, "address": target, "reuse_port": True},
            )
            pool.start(loaded=runtime.devices is not None)
        except BaseException:
            holder.close()
            raise
        frontends = GrpcFrontendListener(pool, holder, target)
        runtime.frontends.append(pool)
        runtime.transports.append(frontends)
        lifetime.keep_serving(runtime.stop)
    log.info("Serving gRPC server listening on %s (%d front-end process%s)", target, count, "" if count == 1 else "es")
    return frontends
