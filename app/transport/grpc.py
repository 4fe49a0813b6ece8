"""The gRPC transport: MindSpore Serving's ``MSService/Predict`` on grpcio.

`GrpcTransport` serves, on one address (``host:port`` or ``unix:PATH``, plain or TLS):

* ``/mindspore.serving.proto.MSService/Predict``, wire-compatible with MindSpore
  Serving 2.0.2, through the same `Dataplane` as REST (admission, lookup, deadline,
  pipeline, error mapping); the messages are `mserve.protocol.grpc_codec`'s. Every
  outcome is gRPC status OK, failures travel in ``error_msg`` (PROTOCOL.md section 5);
  only what grpcio itself refuses (a message over ``max_msg_mb_size``) is a gRPC error.
* The Open Inference Protocol's ``inference.GRPCInferenceService`` through the same
  `Dataplane` (`mserve.transport.v2_service`).
* The standard health service ``grpc.health.v1.Health``: ``SERVING`` (for ``""``,
  ``mindspore.serving.proto.MSService`` and ``inference.GRPCInferenceService``) exactly
  when ``GET /ready`` would answer 200, ``NOT_SERVING`` otherwise.

Each predict gets a request id (the client's ``x-request-id`` metadata when sane,
else a new one; sent back as trailing metadata), one access-log record and the
request metrics, labelled like REST (status: the outcome as an HTTP status).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..ops.access_log import access_log, checked_request_id, current_request_id, log_request
from ..ops.metrics import RequestMetrics
from ..protocol import grpc_codec
from ..protocol import ms_service_pb2 as pb
from ..protocol import ms_service_pb2_grpc as pb_grpc
from ..protocol.urls import PredictTarget
from ..serving.dataplane import Dataplane
from ..serving.reload import RequestEpochs
from .grpc_limits import ConnectionWatch, GrpcLimits
from .http import connection_capacity
from .memory import RELEASE_AFTER_BYTES, release_memory
from .v2_service import InferenceServicer, add_inference_service

log = logging.getLogger("mserve.transport.grpc")

SERVICE_NAME = "mindspore.serving.proto.MSService"
TAG = "Serving gRPC"
_MAX_TARGETS = 1024


# The folder (under the current directory) where MindSpore Serving keeps its own
# unix sockets; it exists once a MindSpore Serving server has started.
MINDSPORE_SOCKET_FOLDER = "unix_socket_files"


def check_address(address: str) -> None:
    """MindSpore Serving's address checks (``Serving Error: ...``); port 0 (pick a
    free port) is an mserve addition."""
    if not isinstance(address, str) or not address:
        raise RuntimeError(f"Parameter 'address' should be a non-empty str, but actually {address!r}")
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if not path:
            raise RuntimeError("Serving Error: Empty grpc server unix domain socket address")
        path = path[2:] if path.startswith("//") else path  # unix:///abs/path is also gRPC's syntax
        directory = os.path.dirname(os.path.abspath(path))
        if directory == os.path.abspath(MINDSPORE_SOCKET_FOLDER):
            # MindSpore Serving makes this folder whenever it starts, and scripts put their sockets there.
            os.makedirs(directory, exist_ok=True)
        if not os.path.isdir(directory):
            raise RuntimeError(
                f"Serving Error: {TAG} server start failed, the directory {directory} of the unix domain socket "
                f"address '{address}' does not exist"
            )
        _check_unix_path_free(path, address)
        return
    position = address.rfind(":")
    if position < 0:
        raise RuntimeError(f"Serving Error: The format of the {TAG} address '{address}' is illegal")
    if position == 0 or position == len(address) - 1:
        raise RuntimeError(f"Serving Error: Missing ip or port of the {TAG} address '{address}'")
    port = address[position + 1:]
    if not port.isdigit() or not port.isascii():
        raise RuntimeError(f"Serving Error: The type of {TAG} address '{address}' port is not a number")
    if int(port) > 65535:
        raise RuntimeError(
            f"Serving Error: The port of the {TAG} address '{address}' is out of legal range [1 ~ 65535]"
        )


def _check_unix_path_free(path: str, address: str) -> None:
    """grpcio replaces whatever is at a unix socket's path: refuse a path that is not a
    socket, or a socket some server still answers on (a stale one may be replaced)."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise RuntimeError(f"Serving Error: {TAG} server start failed, {path} of address '{address}' is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return  # nobody listens: a socket left behind by a process that is gone
    finally:
        probe.close()
    raise RuntimeError(
        f"Serving Error: {TAG} server start failed, address '{address}' is in use: a server answers on {path}"
    )


def server_credentials(ssl_config: Any, address: str) -> grpc.ServerCredentials:
    """grpcio credentials for an `mserve.server.SSLConfig`: one-way TLS, or mutual
    (client certificates must chain to ``custom_ca``) with ``verify_client=True``.
    The files are checked first: a bad one fails as MindSpore Serving fails
    (``... create server failed, address ...``), the HTTPS transport's clear reason after."""
    from .https import build_ssl_context

    try:
        build_ssl_context(ssl_config)
    except RuntimeError as exc:
        raise RuntimeError(
            f"Serving Error: {TAG} server start failed, create server failed, address {address}: {exc}"
        ) from None
    with open(ssl_config.certificate, "rb") as f:
        certificate = f.read()
    with open(ssl_config.private_key, "rb") as f:
        private_key = f.read()
    custom_ca = None
    if ssl_config.verify_client:
        with open(ssl_config.custom_ca, "rb") as f:
            custom_ca = f.read()
    return grpc.ssl_server_credentials(
        [(private_key, certificate)], root_certificates=custom_ca, require_client_auth=bool(ssl_config.verify_client)
    )


class ReadinessHealth(health.HealthServicer):
    """grpc.health.v1 answering from the server's readiness (``GET /ready``)."""

    SERVICES = ("", SERVICE_NAME, "inference.GRPCInferenceService")

    def __init__(self, readiness: Callable[[], tuple[bool, str]]):
        super().__init__()
        self._readiness = readiness
        self._status: int | None = None
        self.refresh()

    def refresh(self) -> None:
        """Publish the current readiness (Watch streams see the change)."""
        ready = self._readiness()[0]
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if status != self._status:
            self._status = status
            for service in self.SERVICES:
                self.set(service, status)

    def Check(self, request: Any, context: Any) -> Any:
        self.refresh()
        return super().Check(request, context)

    def shut_down(self) -> None:
        """NOT_SERVING for good, and end the Watch streams after telling them: an
        open stream is a call in flight, which would hold the server's stop for its
        whole drain time. (grpcio's servicer keeps the streams' callbacks in
        ``_send_response_callbacks``; ``None`` ends a stream with status OK.)"""
        self.enter_graceful_shutdown()
        with self._lock:
            callbacks = [cb for per_service in self._send_response_callbacks.values() for cb in per_service]
        for callback in callbacks:
            callback(None)


class PredictServicer(pb_grpc.MSServiceServicer):
    """``MSService/Predict`` over a `Dataplane`."""

    def __init__(self, dataplane: Dataplane, epochs: RequestEpochs):
        self.dataplane = dataplane
        self.epochs = epochs
        self.metrics = RequestMetrics(dataplane.registry.servables)
        self._targets: dict[tuple[str, int, str], tuple[PredictTarget, str, str]] = {}

    def Predict(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        given = None
        for key, value in context.invocation_metadata():
            if key == "x-request-id":
                given = value
        rid = checked_request_id(given)
        token = current_request_id.set(rid)
        try:
            spec = request.servable_spec
            reply = pb.PredictReply()
            reply.servable_spec.CopyFrom(spec)
            name, number, method_name = spec.name, spec.version_number, spec.method_name
            named = self._targets.get((name, number, method_name))
            if named is None:
                named = self._target(name, number, method_name)
            target, path, where = named

            def decode(version: Any, method: Any) -> list[list[Any]]:
                self.dataplane.check_instance_count(len(request.instances))
                return grpc_codec.decode_instances(request, method, version.name)

            def build(method: Any, results: Any) -> tuple[int, Any]:
                return grpc_codec.build_reply(reply, method, results), reply

            epoch = self.epochs.enter()
            try:
                outcome = self.dataplane.predict(lambda: target, decode, build, where=where)
            finally:
                self.epochs.leave(epoch)
            if outcome.error is not None:
                grpc_codec.set_error(reply, outcome.status, outcome.error)
            context.set_trailing_metadata((("x-request-id", rid),))
            elapsed = time.perf_counter() - started
            self.metrics.observe(path, outcome.status, elapsed)
            size = request.ByteSize()
            if access_log.isEnabledFor(logging.INFO):
                peer = {"REMOTE_ADDR": context.peer(), "CONTENT_LENGTH": size}
                log_request("gRPC", path, outcome.status, elapsed, rid, peer, reply.ByteSize())
            if size >= RELEASE_AFTER_BYTES:
                release_memory(collect=outcome.status >= 400)
            return reply
        finally:
            current_request_id.reset(token)

    def path_of(self, request: Any) -> str:
        """A request's target as the REST path that names it (``/model/add:add_common``)."""
        spec = request.servable_spec
        name, number, method = spec.name, spec.version_number, spec.method_name
        named = self._targets.get((name, number, method))
        return (named or self._target(name, number, method))[1]

    def _target(self, name: str, number: int, method: str) -> tuple[PredictTarget, str, str]:
        """What a servable spec names, its path as REST spells it (metrics, log), and
        where a failure is logged from; kept for the next call (client-chosen names:
        the table is bounded)."""
        version = f"/version/{number}" if number else ""
        path = f"/model/{name}{version}:{method}"
        named = (PredictTarget(name, number, method), path, f"gRPC {path}")
        if len(self._targets) >= _MAX_TARGETS:
            self._targets.clear()
        self._targets[(name, number, method)] = named
        return named


class GrpcTransport:
    """One started gRPC endpoint; `stop` drains it."""

    scheme = "grpc"

    def __init__(
        self,
        dataplane: Dataplane,
        address: str,
        readiness: Callable[[], tuple[bool, str]],
        epochs: RequestEpochs | None = None,
        max_msg_mb_size: int = 100,
        ssl_config: Any = None,
        threads: int = 16,
        reuse_port: bool = False,
        limits: GrpcLimits | None = None,
    ):
        limits, max_connections = checked_limits(address, limits)
        self.limits = limits
        self.address = address
        self.dataplane = dataplane
        self.ssl_config = ssl_config
        self.health = ReadinessHealth(readiness)
        limit = max_msg_mb_size * 1024 * 1024
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mserve-grpc"),
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # As MindSpore Serving: a port in use is an error, unless worker
                # processes share it on purpose (mserve start --workers N).
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                # What one client may hold (docs/operations.md, "Limits").
                ("grpc.max_allowed_incoming_connections", max_connections),
                ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
                ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
            ],
            maximum_concurrent_rpcs=limits.max_calls,
        )
        self._watch = ConnectionWatch(max_connections, limits.max_calls, lambda: dataplane.active)
        epochs = epochs or RequestEpochs()
        pb_grpc.add_MSServiceServicer_to_server(PredictServicer(dataplane, epochs), self._server)
        # The Open Inference Protocol (KServe v2) on the same server and port: mserve.transport.v2_service.
        add_inference_service(self._server, InferenceServicer(dataplane, readiness, epochs))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = 0

    @property
    def target(self) -> str:
        """What a client dials: ``host:port`` (the real port when 0 was asked) or ``unix:PATH``."""
        if self.address.startswith("unix:"):
            return self.address
        host = self.address[: self.address.rfind(":")]
        return f"{host}:{self.port}"

    def start(self) -> None:
        """Listen and serve; `RuntimeError` ``Serving Error: ...`` when that fails."""
        try:
            if self.ssl_config is not None:
                port = self._server.add_secure_port(self.address, server_credentials(self.ssl_config, self.address))
            else:
                port = self._server.add_insecure_port(self.address)
        except RuntimeError as exc:
            if str(exc).startswith("Serving Error"):
                raise
            port, detail = 0, f": {exc}"
        else:
            detail = ""
        unix = self.address.startswith("unix:")
        if not port:
            why = (None if unix else _why_not_bound(self.address)) or detail
            raise RuntimeError(
                f"Serving Error: {TAG} server start failed, create server failed, address {self.address}{why}"
            )
        self.port = 0 if unix else port
        self._server.start()
        self._watch.start()
        log.info("%s server listening on %s%s", TAG, self.target, " (TLS)" if self.ssl_config else "")

    def refresh_health(self) -> None:
        self.health.refresh()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Health answers NOT_SERVING; the listener closes and open connections get a
        GOAWAY (new calls are refused); every call already received, running or
        waiting for a thread, gets up to ``drain_timeout`` seconds to finish."""
        self.health.shut_down()
        self._watch.stop()
        self._server.stop(grace=drain_timeout).wait(drain_timeout + 0.5)
        self.dataplane.draining = True


def resolve_for_listening(address: str) -> tuple[str, list[Any]]:
    """The ``Serving Error`` text that starts a failure to serve ``host:port``, and what
    ``host`` resolves to for listening (``getaddrinfo``); that error when it does not."""
    host, _, port = address.rpartition(":")
    bare = host.strip("[]")
    failed = f"Serving Error: {TAG} server start failed, create server failed, address {address}"
    try:
        return failed, socket.getaddrinfo(bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{failed}: cannot resolve host {bare!r} ({exc})") from None


def checked_limits(address: str, limits: GrpcLimits | None) -> tuple[GrpcLimits, int]:
    """What both gRPC servers check first: ``address`` by MindSpore's rules and the
    limits; returns the limits and how many connections a process may hold (the
    descriptor limit raised as REST raises it)."""
    check_address(address)
    limits = limits or GrpcLimits()
    limits.check()
    return limits, connection_capacity(limits.max_connections)


def reserve_port(address: str, shared: bool = False) -> tuple[socket.socket, str]:
    """Bind ``host:port`` (port 0: a free one) for processes that will each serve it
    with SO_REUSEPORT; returns the bound, never listening, socket that holds the port
    until they stop, and the ``host:port`` they bind. The port must be free (as
    MindSpore Serving requires) unless ``shared``. ``Serving Error: ...`` otherwise."""
    check_address(address)
    host = address.rpartition(":")[0]
    failed, infos = resolve_for_listening(address)
    family, kind, proto, _, sockaddr = infos[0]

    def bind(where: Any, reuse_port: bool) -> socket.socket:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpcio's own listeners
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(where)
        except OSError as exc:
            sock.close()
            raise RuntimeError(f"{failed}: {exc.strerror or exc}") from None
        return sock

    # Without SO_REUSEPORT first: that bind fails if anyone holds the port, sharing or not.
    probe = bind(sockaddr, shared)
    chosen = probe.getsockname()[1]
    if shared:
        return probe, f"{host}:{chosen}"
    probe.close()
    return bind((sockaddr[0], chosen, *sockaddr[2:]), True), f"{host}:{chosen}"


def _why_not_bound(address: str) -> str:
    """Why grpcio could not bind ``host:port`` (it only says that it failed)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:
        return f": cannot resolve host {host!r} ({exc})"
    family, kind, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.bind(sockaddr)
    except OSError as exc:
        return f": {exc.strerror or exc}"
    finally:
        probe.close()
    return ""
