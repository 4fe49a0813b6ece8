"""A runtime's listeners: the RESTful server (HTTP or HTTPS), the gRPC server and
the plain-HTTP health port, each a transport in the runtime's ``transports`` (with
``stop(drain_timeout)``). In devices mode a RESTful or gRPC ``host:port`` is served
by front-end processes instead (`mserve.runtime.frontends`).

The functions take the `mserve.runtime.runtime.Runtime` they serve as their first
argument; the `Runtime` class makes them its methods.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from .. import lifetime, logsetup
from ..serving.dataplane import DEFAULT_MAX_INSTANCES, Dataplane, PredictHandler
from ..transport.balance import ConnectionBalance
from ..transport.http import ConnectionLimits, WaitressTransport, bind_socket, parse_address
from ..serving.enqueue_limit import ENQUEUE_LIMIT
from ..transport.inline import InlinePolicy
from ..transport.listen_rules import GRPC, RESTFUL, bind_restful, check_restful_address, check_restful_tls
from ..transport.memory import limit_arenas
from ..transport.wsgi import create_app
from .config import SSLConfig
from .frontends import start_frontends, start_grpc_frontends

log = logging.getLogger("mserve.server")


class RestfulServer:
    """A started RESTful endpoint (returned by `start_restful_server`)."""

    def __init__(self, transport: Any, host: str):
        self.transport = transport
        self.host = host

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.scheme}://{host}:{self.port}"


def start_restful_server(
    runtime: Any,
    address: str = "127.0.0.1:5500",
    max_msg_mb_size: int = 100,
    ssl_config: SSLConfig | None = None,
    threads: int = 16,
    max_enqueued_requests: int | None = None,
    request_timeout: float = 100.0,
    sock: socket.socket | None = None,
    balance: ConnectionBalance | None = None,
    inline_max_ms: float = 1.0,
    max_instances_per_request: int = DEFAULT_MAX_INSTANCES,
    max_connections: int | None = None,
    idle_timeout: float = 60.0,
    header_timeout: float = 30.0,
    handshake_timeout: float = 10.0,
    max_header_kb: int = 64,
    workers: int | None = None,
    additional: bool = False,
) -> RestfulServer:
    """Serve the loaded servables over HTTP (HTTPS with ``ssl_config``) at ``address``
    (``host:port``; port 0 picks a free one, see the returned server's ``port``).

    mserve additions: ``threads`` (HTTP worker threads; requests waiting on a batch
    hold one each), ``max_enqueued_requests`` (more at once get 503; ``None``: MindSpore's
    ``server.master.context.set_max_enqueued_requests`` value, 10000 unless set), and
    ``request_timeout`` in seconds (late instances get ``Time out``), and ``sock``, an
    already listening socket to serve instead of binding ``address`` (worker
    processes share one this way, evened out by ``balance``), and
    ``inline_max_ms``: predicts of methods that take at most this long (and do not
    batch across requests) run on the HTTP I/O thread, saving two thread hand-offs
    each (see `mserve.transport.inline`; 0 turns it off).

    Limits on what clients may hold (README, "Limits and hostile clients"):
    ``max_instances_per_request`` (413 beyond), ``max_connections`` (the longest-idle
    connections are closed to make room; None: 10,000 or what the descriptor limit
    allows), ``idle_timeout``, ``header_timeout``, ``handshake_timeout`` (seconds),
    ``max_header_kb`` (request line and headers; 431 beyond).

    ``workers``: front-end processes serving the port in devices mode (the default,
    see the module docstring); ``None`` is `default_workers`. Each front-end applies
    these limits to its own connections.

    From here on the process keeps serving after the calling script ends, until
    `stop` or SIGINT/SIGTERM (see `mserve.lifetime`).

    As in MindSpore Serving, a process runs one RESTful server: a second call raises
    ``Serving Error: RESTful server is already running`` unless it passes
    ``additional=True`` (mserve addition: another listener beside the first).
    """
    logsetup.for_start_script()  # a start script logs where it listens and when it is ready
    if sock is None:  # MindSpore's rules (mserve.transport.listen_rules); front-ends pass their socket
        if not additional:
            runtime.listener_slots.check_free(RESTFUL)
        check_restful_address(address)
    if isinstance(max_msg_mb_size, bool) or not isinstance(max_msg_mb_size, int):
        raise RuntimeError(f"Parameter 'max_msg_mb_size' should be int, but actually {type(max_msg_mb_size)}")
    if not 1 <= max_msg_mb_size <= 512:
        raise RuntimeError("Parameter 'max_msg_mb_size' should be in range [1,512]")
    if inline_max_ms < 0:
        raise RuntimeError(f"inline_max_ms must be >= 0, got {inline_max_ms!r}")
    if sock is None and runtime.processes() == "devices":
        restful = {
            "max_msg_mb_size": max_msg_mb_size, "threads": threads,
            "max_enqueued_requests": ENQUEUE_LIMIT.resolve(max_enqueued_requests),
            "request_timeout": request_timeout, "inline_max_ms": inline_max_ms,
            "max_instances_per_request": max_instances_per_request, "max_connections": max_connections,
            "idle_timeout": idle_timeout, "header_timeout": header_timeout, "handshake_timeout": handshake_timeout,
            "max_header_kb": max_header_kb,
        }
        frontends = start_frontends(runtime, address, ssl_config, restful, workers)
        runtime.listener_slots.taken(RESTFUL)
        server = RestfulServer(frontends, parse_address(address)[0])
        count = frontends.pool.workers
        log.info("RESTful server listening on %s (%d front-end process%s)", server.url, count, "" if count == 1 else "es")
        _listening(runtime, server.url)
        return server
    if workers is not None and workers != 1:
        raise RuntimeError(f"workers={workers} needs device processes (processes mode 'devices'), not 'single'")
    host, port = parse_address(address)
    max_body = max_msg_mb_size * 1024 * 1024
    if not isinstance(max_instances_per_request, int) or max_instances_per_request < 1:
        raise RuntimeError(f"max_instances_per_request must be an integer >= 1, got {max_instances_per_request!r}")
    limits = ConnectionLimits(max_connections, idle_timeout, header_timeout, handshake_timeout, max_header_kb * 1024)
    limits.check()
    handler = PredictHandler(
        runtime.registry, ENQUEUE_LIMIT.resolve(max_enqueued_requests), request_timeout,
        loading=lambda: runtime.loading > 0, max_instances=max_instances_per_request,
    )
    if max_enqueued_requests is None:  # MindSpore's master.context.set_max_enqueued_requests moves it
        ENQUEUE_LIMIT.follow(handler)
    inline = InlinePolicy(inline_max_ms / 1000, handler.inline_eligible) if inline_max_ms else None
    limit_arenas()  # before the transport's threads start (see mserve.transport.memory)
    app = create_app(handler, max_body, runtime, inline)
    if ssl_config is not None:
        from ..transport.https import build_ssl_context

        check_restful_tls(ssl_config, build_ssl_context)  # bad files fail here, before the port is taken
    with runtime.lock:
        if sock is None:
            sock = bind_restful(address, host, port, bind_socket)
            runtime.listener_slots.taken(RESTFUL)
        try:
            if ssl_config is not None:
                from ..transport.https import TlsTransport

                transport: Any = TlsTransport(
                    app, sock, ssl_config, threads=threads, max_body_bytes=max_body, balance=balance, inline=inline,
                    limits=limits, shed=handler.should_shed,
                )
            else:
                transport = WaitressTransport(
                    app, sock, threads=threads, max_body_bytes=max_body, balance=balance, inline=inline,
                    limits=limits, shed=handler.should_shed,
                )
            transport.start()
        except BaseException:
            sock.close()
            raise
        runtime.handlers.append(handler)
        runtime.transports.append(transport)
        lifetime.keep_serving(runtime.stop)
    server = RestfulServer(transport, host)
    log.info("RESTful server listening on %s", server.url)
    _listening(runtime, server.url)
    return server


def start_grpc_server(
    runtime: Any,
    address: str,
    max_msg_mb_size: int = 100,
    ssl_config: SSLConfig | None = None,
    threads: int = 16,
    max_enqueued_requests: int | None = None,
    request_timeout: float = 100.0,
    reuse_port: bool = False,
    max_instances_per_request: int = DEFAULT_MAX_INSTANCES,
    workers: int | None = None,
    max_connections: int | None = None,
    idle_timeout: float = 60.0,
    max_streams_per_connection: int = 100,
    additional: bool = False,
    inline_max_ms: float = 1.0,
) -> Any:
    """Serve the loaded servables over gRPC (MindSpore Serving's ``MSService``, and
    the ``grpc.health.v1`` health service) at ``address``: ``{ip}:{port}`` or
    ``unix:{path}`` (relative or absolute; its directory must exist).
    ``max_msg_mb_size`` (1..512) limits request and reply messages; ``ssl_config``
    serves TLS, mutual with ``verify_client=True``. Raises ``RuntimeError("Serving
    Error: ...")`` when it cannot start (bad address, port in use, bad key).

    mserve additions: port 0 picks a free port (``.port``/``.target`` on the returned
    server), ``threads`` (calls served at once), ``max_enqueued_requests``,
    ``request_timeout`` and ``max_instances_per_request`` as for
    `start_restful_server`, and ``reuse_port`` (worker processes sharing one port).
    Limits per process (`mserve.transport.grpc_limits`): ``max_connections``,
    ``idle_timeout`` (seconds without a call), ``max_streams_per_connection``; calls
    at once in a process: twice ``max_enqueued_requests`` plus ``threads``.
    ``inline_max_ms``: as for `start_restful_server`, predicts this quick run on the
    gRPC server's event loop (0: always in its threads).

    Plain ``host:port`` addresses are served by mserve's own HTTP/2 server
    (`mserve.transport.grpc_h2`); TLS and ``unix:`` addresses by grpcio's.

    In devices mode (the default, see the module docstring) a ``host:port`` address
    is served by ``workers`` front-end processes of its own (``None``:
    `default_grpc_workers`), each binding the port with SO_REUSEPORT so the kernel spreads
    gRPC connections over them; they decode, run the Python stages and send model
    calls to the device processes, as REST's front-ends do, and each one's health
    service says SERVING once it serves the servables. A ``unix:`` address is served
    by this process (its registry follows the device processes). Either may be
    started before or after `start_restful_server` and `start_servables`.

    As in MindSpore Serving, a process runs one gRPC server: a second call raises
    ``Serving Error: Serving gRPC server is already running`` unless it passes
    ``additional=True`` (mserve addition: another address, e.g. a ``unix:`` socket).
    """
    logsetup.for_start_script()  # a start script logs where it listens and when it is ready
    from ..transport.grpc import GrpcTransport
    from ..transport.grpc_h2 import H2GrpcTransport
    from ..transport.grpc_limits import GrpcLimits

    if not (reuse_port or additional):  # MindSpore's one-server rule (front-ends share a port: reuse_port)
        runtime.listener_slots.check_free(GRPC)
    if isinstance(max_msg_mb_size, bool) or not isinstance(max_msg_mb_size, int):
        raise RuntimeError(f"Parameter 'max_msg_mb_size' should be int, but actually {type(max_msg_mb_size)}")
    if not 1 <= max_msg_mb_size <= 512:
        raise RuntimeError("Parameter 'max_msg_mb_size' should be in range [1,512]")
    if ssl_config is not None and not isinstance(ssl_config, SSLConfig):
        raise RuntimeError("The type of ssl_config should be type of SSLConfig")
    if not isinstance(max_instances_per_request, int) or max_instances_per_request < 1:
        raise RuntimeError(f"max_instances_per_request must be an integer >= 1, got {max_instances_per_request!r}")
    if isinstance(inline_max_ms, bool) or not isinstance(inline_max_ms, (int, float)) or inline_max_ms < 0:
        raise RuntimeError(f"inline_max_ms must be a number >= 0, got {inline_max_ms!r}")
    unix = isinstance(address, str) and address.startswith("unix:")
    if runtime.processes() == "devices" and not unix:
        grpc = {
            "inline_max_ms": inline_max_ms,
            "max_msg_mb_size": max_msg_mb_size, "threads": threads,
            "max_enqueued_requests": ENQUEUE_LIMIT.resolve(max_enqueued_requests),
            "request_timeout": request_timeout, "max_instances_per_request": max_instances_per_request,
            "max_connections": max_connections, "idle_timeout": idle_timeout,
            "max_streams_per_connection": max_streams_per_connection,
        }
        frontends = start_grpc_frontends(runtime, address, ssl_config, grpc, reuse_port, workers)
        runtime.listener_slots.taken(GRPC)
        _listening(runtime, f"gRPC {frontends.target}")
        return frontends
    if workers is not None and workers != 1:
        raise RuntimeError(
            f"workers={workers} needs device processes (processes mode 'devices') and a host:port address"
        )
    dataplane = Dataplane(
        runtime.registry, ENQUEUE_LIMIT.resolve(max_enqueued_requests), request_timeout,
        loading=lambda: runtime.loading > 0, max_instances=max_instances_per_request,
    )
    if max_enqueued_requests is None:  # MindSpore's master.context.set_max_enqueued_requests moves it
        ENQUEUE_LIMIT.follow(dataplane)
    with runtime.lock:
        # Calls at once: room beyond the queue limit, so that MindSpore's own "enqueued requests
        # count exceeds the limit" answers first; grpcio's RESOURCE_EXHAUSTED is the backstop.
        limits = GrpcLimits(max_connections, idle_timeout, max_streams_per_connection,
                            2 * ENQUEUE_LIMIT.resolve(max_enqueued_requests) + threads)
        if ssl_config is None and not unix:  # mserve's own HTTP/2 server (mserve.transport.grpc_h2)
            transport: Any = H2GrpcTransport(
                dataplane, address, runtime.readiness, runtime.epochs, max_msg_mb_size, threads, reuse_port, limits,
                inline_max_ms,
            )
        else:
            transport = GrpcTransport(
                dataplane, address, runtime.readiness, runtime.epochs, max_msg_mb_size, ssl_config, threads,
                reuse_port, limits,
            )
        transport.start()
        runtime.handlers.append(dataplane)
        runtime.transports.append(transport)
        runtime.ready_listeners.append(transport.refresh_health)
        runtime.listener_slots.taken(GRPC)
        lifetime.keep_serving(runtime.stop)
    log.info("Serving gRPC server listening on %s", transport.target)
    _listening(runtime, f"gRPC {transport.target}")
    return transport


def start_health_server(runtime: Any, address: str = "127.0.0.1:5501", threads: int = 2) -> RestfulServer:
    """Serve ``GET /health`` and ``GET /ready`` alone over plain HTTP at ``address``
    (mserve addition): probes that need no client certificate when the RESTful server
    requires one (mutual TLS), and nothing else (no predicts, no metadata). Bind it to
    127.0.0.1 unless the probes come from outside (a kubelet's ``httpGet``). Stopped by
    `stop` with the rest; call it before `start_servables` to answer while loading."""
    from ..ops.endpoints import create_probe_app

    host, port = parse_address(address)
    with runtime.lock:
        sock = bind_socket(host, port)
        try:
            transport = WaitressTransport(create_probe_app(runtime), sock, threads=threads, max_body_bytes=1 << 16)
            transport.start()
        except BaseException:
            sock.close()
            raise
        runtime.transports.append(transport)
    probes = RestfulServer(transport, host)
    log.info("health and readiness (plain HTTP, no client certificate) on %s/health and /ready", probes.url)
    return probes


def _listening(runtime: Any, address: str) -> None:
    """A start script says where it listens, and once ready, that it is (mserve.logsetup)."""
    runtime.ready_log.listening(address)
    runtime.log_if_ready()
