"""Waitress as the HTTP transport, run in the background with a graceful stop.

What Waitress does not do out of the box, done here:

* Its own early refusals (body over the limit, malformed HTTP) answer with JSON
  ``{"error_msg"}`` like the rest of the protocol. Waitress checks Content-Length
  against ``max_request_body_size`` before reading the body, so an over-limit body
  is refused unread.
* Requests an `InlinePolicy` knows to be quick run on the I/O thread that read them,
  skipping the two thread hand-offs of Waitress's worker pool (inline.py).
* Worker processes sharing the socket take turns accepting (balance.py).
* A reply goes out in one ``send``.
* `WaitressTransport.stop` stops accepting, lets in-flight requests finish (up to a
  drain timeout), then closes every connection.
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from typing import Any, Callable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import RequestEntityTooLarge

from .balance import ConnectionBalance
from ..protocol.codec import dumps
from .inline import InlinePolicy

log = logging.getLogger("mserve.transport.http")


def parse_address(address: str, default_port: int = 5500) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too); an empty host means 127.0.0.1."""
    address = address.strip()
    if not address:
        return "127.0.0.1", default_port
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            host, port = address, ""
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"address {address!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"address {address!r}: port {number} is out of range")
    return host or "127.0.0.1", number


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket; ``port=0`` picks a free one."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _JsonErrorTask(ErrorTask):
    def execute(self) -> None:
        error = self.request.error
        if isinstance(error, RequestEntityTooLarge):
            limit = self.channel.server.adj.max_request_body_size - 1
            message = f"http message is bigger than {limit}"
        else:
            message = f"{error.reason}: {error.body}"
        body = dumps({"error_msg": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Parser(HTTPRequestParser):
    """Waitress counts chunk framing (size lines, CRLFs) against the body limit, so
    a chunked body gets headroom for it here; the app's `read_body` then enforces the
    exact limit on the payload. Content-Length bodies keep the exact, unread check."""

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked:
            limit = self.adj.max_request_body_size
            self.adj = _with_body_limit(self.adj, limit + limit // 8 + (1 << 16))


def _with_body_limit(adj: Adjustments, limit: int) -> Adjustments:
    """A copy of ``adj`` with another body limit (made once per server)."""
    cached = getattr(adj, "_mserve_chunked", None)
    if cached is None:
        cached = copy.copy(adj)
        cached.max_request_body_size = limit
        adj._mserve_chunked = cached  # type: ignore[attr-defined]
    return cached


class _Task(WSGITask):
    """One request: tells the app whether it runs inline (on the I/O thread), and
    sends the status line, headers and body of a one-piece reply in one write.

    Waitress writes the header block and the body separately, and (with its default
    ``send_bytes=1``) each write is a ``send`` of its own: two syscalls and two TCP
    segments per small JSON reply. Joined, a reply is one ``send`` from the thread
    that ran the request."""

    def get_environment(self) -> dict:
        environ = super().get_environment()
        # The app times inline requests by the wall clock, others by thread CPU.
        environ["mserve.inline"] = threading.current_thread() is self.channel.server.loop_thread
        return environ

    def write(self, data: bytes) -> None:
        if not self.wrote_header and data and self.complete and self.has_body and self.request.command != "HEAD":
            cl = self.content_length
            if cl is not None and len(data) <= cl:
                self.wrote_header = True
                self.content_bytes_written += len(data)
                self.channel.write_soon(self.build_response_header() + data)
                return
        super().write(data)


class _Channel(HTTPChannel):
    task_class = _Task
    error_task_class = _JsonErrorTask
    parser_class = _Parser
    inline_pending = False  # set by _Server.add_task: serve on this thread once the read is done

    def handle_read(self) -> None:
        super().handle_read()
        # Not from inside received(): it holds requests_lock, which service() takes.
        while self.inline_pending:
            self.inline_pending = False
            self.service()

    def _flush_outbufs_below_high_watermark(self) -> None:
        # A worker thread waits here for the I/O thread to drain a huge reply; the
        # I/O thread itself must not wait for itself. It flushes on its next turn.
        if threading.current_thread() is not self.server.loop_thread:
            super()._flush_outbufs_below_high_watermark()


class _Server(TcpWSGIServer):
    channel_class = _Channel
    balance: ConnectionBalance | None = None
    inline: InlinePolicy | None = None
    loop_thread: threading.Thread | None = None

    def add_task(self, task: Any) -> None:
        # ``task`` is the channel with a complete request at requests[0].
        if self.inline is not None and threading.current_thread() is self.loop_thread:
            request = task.requests[0]
            if self.inline.allows(request.command, request.path, request.content_length):
                task.inline_pending = True
                return
        super().add_task(task)

    def pull_trigger(self) -> None:
        # The wake-up is for the I/O thread; it needs none from itself (inline
        # requests), as it re-polls every connection after this turn anyway.
        if threading.current_thread() is not self.loop_thread:
            self.trigger.pull_trigger()

    declined = False  # the balance said another worker's turn at the last look

    def readable(self) -> bool:
        # Called on every turn of the loop, which is when a worker process takes or
        # declines its turn at accepting (see balance.py).
        if not super().readable():
            return False
        self.declined = self.balance is not None and not self.balance.may_accept(len(self.active_channels))
        return not self.declined


class InFlight:
    """Counts requests inside the app, so a stop can wait for them."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app
        self.count = 0
        self._cv = threading.Condition()

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Any:
        with self._cv:
            self.count += 1
        try:
            return self.app(environ, start_response)
        finally:
            with self._cv:
                self.count -= 1
                if not self.count:
                    self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self.count == 0, timeout)


class WaitressTransport:
    """A WSGI app on a listening socket, served by Waitress in a background thread."""

    scheme = "http"

    def __init__(
        self,
        app: Callable[..., Any],
        sock: socket.socket,
        *,
        threads: int,
        max_body_bytes: int,
        balance: ConnectionBalance | None = None,
        inline: InlinePolicy | None = None,
    ):
        self.socket = sock
        self.app = InFlight(app)
        adj = Adjustments(
            threads=threads,
            # Waitress refuses a Content-Length >= this before reading the body.
            max_request_body_size=max_body_bytes + 1,
            ident="mserve",
            channel_timeout=120,
            connection_limit=1000,
            outbuf_overflow=1 << 22,
        )
        self._map: dict = {}
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(threads)
        sockinfo = (sock.family, sock.type, sock.proto, sock.getsockname())
        self._server = _Server(
            self.app, self._map, True, sock, dispatcher=self._dispatcher, adj=adj, bind_socket=False, sockinfo=sockinfo
        )
        self._server.balance = balance
        self._server.inline = inline
        # Waitress wraps the app in a middleware that deletes X-Forwarded-* headers
        # from every request's environ; mserve never reads them, so skip its cost.
        self._server.application = self.app
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mserve-http", daemon=True)

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    def _run(self) -> None:
        self._server.loop_thread = threading.current_thread()
        try:
            while self._map and not self._closed:
                # Not listening by turn: look again soon, the turn may have come.
                wasyncore.poll2(0.05 if self._server.declined else 1.0, self._map)
        except Exception:  # pragma: no cover - waitress's loop is not expected to raise
            log.exception("HTTP loop stopped")

    def _close_connections(self) -> None:
        """Runs on the loop thread: close the listener and every connection, but
        not the trigger, whose pipe other threads may still be writing to; `stop`
        closes it once the loop has ended."""
        trigger = self._server.trigger
        for dispatcher in list(self._map.values()):
            if dispatcher is not trigger and dispatcher is not self._server:
                try:
                    dispatcher.close()
                except OSError:
                    pass
        self._closed = True

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight requests finish, then close all connections."""
        if not self._thread.is_alive():
            return
        self._server.trigger.pull_trigger(lambda: wasyncore.dispatcher.close(self._server))
        if not self.app.wait_idle(drain_timeout):
            log.warning("drain timeout: %d request(s) still running", self.app.count)
        # Give written replies a moment to leave the output buffers.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(
            getattr(ch, "total_outbufs_len", 0) for ch in list(self._map.values())
        ):
            time.sleep(0.01)
        self._dispatcher.shutdown(cancel_pending=True, timeout=5)
        trigger = self._server.trigger
        trigger.pull_trigger(self._close_connections)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            # A request thread outliving the drain may still wake the loop; let it
            # find a no-op rather than a closed (or reused) file descriptor.
            trigger._physical_pull = lambda: None
            trigger.close()
