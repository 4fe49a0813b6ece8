"""Waitress as the HTTP transport, run in the background with a graceful stop.

What Waitress does not do out of the box, done here:

* Its own early refusals (body over the limit, malformed HTTP) answer with JSON
  ``{"error_msg"}`` like the rest of the protocol. Waitress checks Content-Length
  against ``max_request_body_size`` before reading the body, so an over-limit body
  is refused unread; a chunked body is limited by its payload, not its framing.
* Connections cost memory, not availability (`ConnectionLimits`): idle connections
  close after ``idle_timeout``, a request head that is not complete ``header_timeout``
  after its first byte is cut, heads are bounded by ``max_header_bytes``; and once
  ``max_connections`` are open, the longest-idle connections without a request in
  progress are closed to make room, so a flood of idle or slow connections cannot
  lock new clients out (Waitress alone stops accepting at its limit).
* A TLS ClientHello sent to this plain-HTTP port is answered at once, in plain text,
  and the connection closed (it would otherwise wait for a header end that never comes).
* Requests an `InlinePolicy` knows to be quick run on the I/O thread that read them,
  skipping the two thread hand-offs of Waitress's worker pool (inline.py). Should one
  of them stall anyway, a watchdog hands the event loop to a fresh thread after
  ``_STALL_SECONDS``, so the other connections keep being served.
* A simple keep-alive predict that arrived whole in one read, to a path the inline
  policy allows, is parsed by mserve and handed straight to the app's
  ``direct_predict`` (direct.py), skipping Waitress's parser, task and WSGI environ;
  its connection counts as busy (not idle) until it is answered.
* Load shedding: a predict that arrives while ``shed(queued)`` says the server is full
  is answered 503 at once on the I/O thread, not queued behind the others.
* Worker processes sharing the socket take turns accepting (balance.py).
* A reply goes out in one ``send``.
* `WaitressTransport.stop` stops accepting at once, so the kernel refuses new
  connections (what it had already accepted is taken and served first), answers
  every request already received, in flight or waiting for a thread, each with
  ``Connection: close``, closes idle connections, and then every connection once
  that is done or the drain timeout is up, whichever comes first.

The HTTPS transport (https.py) is this one with a TLS layer in the channel, so both
share every limit and the same parser.
"""

from __future__ import annotations

import copy
import heapq
import logging
import os
import resource
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import BadRequest, RequestEntityTooLarge

from . import direct
from .balance import ConnectionBalance
from ..protocol.codec import dumps
from .inline import InlinePolicy

log = logging.getLogger("mserve.transport.http")
# Waitress warns "Task queue depth is N" whenever a request waits for a free thread,
# which a server under any load does all the time (and one does at start, when the
# first probes meet warming threads). mserve bounds the wait itself
# (max_enqueued_requests: 503) and the queue shows in its metrics: the warning is noise.
logging.getLogger("waitress.queue").setLevel(logging.ERROR)

_DEFAULT_MAX_CONNECTIONS = 10000
_FD_HEADROOM = 256  # descriptors kept for everything else (model files, pipes, logs)
_STALL_SECONDS = 0.1  # an inline request running longer than this gets the loop handed off
_MAX_CHUNK_LINE = 1024  # a chunk-size line with extensions; real ones are a few bytes
_LINGER_SECONDS = 1.0  # after a closing reply: how long to drain what the client still sends
_ACCEPT_BATCH = 64  # connections accepted per turn of the loop at most
_FRESH_GRACE_SECONDS = 1.0  # at stop: how long a new connection may take to send its request
_CLOSE_SECONDS = 0.5  # at stop, after the drain: for replies to leave and threads to end
_TLS_RECORD = b"\x16\x03"  # a TLS handshake record, as a ClientHello starts
_TLS_ON_PLAIN_MESSAGE = "this port speaks plain HTTP: the client started a TLS handshake, use http://"


@dataclass(frozen=True)
class ConnectionLimits:
    """What one server process lets clients hold (per transport).

    ``max_connections``: open connections; beyond it the longest-idle ones without a
    request in progress are closed to make room (``None``: 10,000, or fewer when
    the process's descriptor limit cannot fit them). ``idle_timeout``: seconds a
    connection may sit between requests. ``header_timeout``: seconds from the first
    byte of a request head to its blank line. ``handshake_timeout``: seconds from
    connect to a finished TLS handshake (HTTPS). ``max_header_bytes``: request line
    plus headers (431 beyond).
    """

    max_connections: int | None = None
    idle_timeout: float = 60.0
    header_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024

    def check(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise RuntimeError(f"max_connections must be at least 1, got {self.max_connections}")
        for name in ("idle_timeout", "header_timeout", "handshake_timeout"):
            if getattr(self, name) <= 0:
                raise RuntimeError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_header_bytes < 1024:
            raise RuntimeError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")


def connection_capacity(wanted: int | None) -> int:
    """How many connections this process can hold: raises the soft descriptor limit
    as far as needed (and allowed). An explicit ``wanted`` that does not fit is an
    error; the default shrinks to fit, with a log line."""
    need = (wanted or _DEFAULT_MAX_CONNECTIONS) + _FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    room = need if soft == resource.RLIM_INFINITY else soft - _FD_HEADROOM
    if wanted is not None:
        if room < wanted:
            raise RuntimeError(
                f"max_connections={wanted} needs {need} file descriptors, but this process may open {soft} "
                f"(hard limit {hard}): raise `ulimit -n` or lower max_connections"
            )
        return wanted
    if room < _DEFAULT_MAX_CONNECTIONS:
        log.info("holding at most %d connections (descriptor limit %d; raise `ulimit -n` for more)", room, soft)
    return max(room, 16) if room < _DEFAULT_MAX_CONNECTIONS else _DEFAULT_MAX_CONNECTIONS


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


def json_error_reply(status: str, message: str) -> bytes:
    """A complete ``Connection: close`` reply with a JSON ``{"error_msg"}`` body,
    for answers given below the WSGI app (no request object to speak of)."""
    body = dumps({"error_msg": message})
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def closing_reply(version: str, status: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A complete ``Connection: close`` reply, sent ahead of (instead of) the app's."""
    lines = [f"HTTP/{version} {status}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "Server: mserve"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _JsonErrorTask(ErrorTask):
    def execute(self) -> None:
        error = self.request.error
        if isinstance(error, RequestEntityTooLarge):
            message = f"http message is bigger than {self.channel.server.max_body_bytes}"
        else:
            message = f"{error.reason}: {error.body}"
        body = dumps({"error_msg": message})
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Parser(HTTPRequestParser):
    """Waitress counts chunk framing (size lines, CRLFs) against the body limit, so a
    body sent in small chunks was refused while its payload was well within it. A
    chunked body is limited here by its payload (what Waitress stores); the raw limit
    only stops framing that is pure overhead. Content-Length bodies keep the exact,
    unread check."""

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if self.chunked:
            limit = self.adj.max_request_body_size
            self.payload_limit = limit
            self.adj = _with_body_limit(self.adj, 8 * limit + (1 << 16))

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        limit = getattr(self, "payload_limit", None)
        chunks = self.body_rcv
        if limit is not None and not self.error and chunks is not None:
            # The payload so far plus what the current chunk announces (refused
            # before it is sent, like an over-limit Content-Length).
            if len(chunks) + chunks.chunk_remainder >= limit:
                self.error = RequestEntityTooLarge(f"exceeds max_body of {limit}")
                self.completed = True
            elif len(chunks.control_line) > _MAX_CHUNK_LINE or len(chunks.trailer) > self.adj.max_request_header_size:
                # Waitress keeps (and re-copies) a chunk-size line or trailer until it
                # ends: bound them like a header.
                self.error = BadRequest("chunk size line or trailer too long")
                self.completed = True
        return consumed


def _with_body_limit(adj: Adjustments, limit: int) -> Adjustments:
    """A copy of ``adj`` with another body limit (made once per server)."""
    cached = getattr(adj, "_mserve_chunked", None)
    if cached is None:
        cached = copy.copy(adj)
        cached.max_request_body_size = limit
        adj._mserve_chunked = cached  # type: ignore[attr-defined]
    return cached


class _Task(WSGITask):
    """One request: tells the app whether it runs inline (on the I/O thread) or is to
    be shed, and sends the status line, headers and body of a one-piece reply in
    one write.

    Waitress writes the header block and the body separately, and (with its default
    ``send_bytes=1``) each write is a ``send`` of its own: two syscalls and two TCP
    segments per small JSON reply. Joined, a reply is one ``send`` from the thread
    that ran the request."""

    abandoned = False  # answered by reply_early: what the app writes now is dropped

    def __init__(self, channel: Any, request: Any):
        super().__init__(channel, request)
        self._reply_lock = threading.Lock()
        if channel.server.draining:
            self.close_on_finish = True  # stopping: the client reconnects elsewhere

    def get_environment(self) -> dict:
        environ = super().get_environment()
        # The app times inline requests by the wall clock, others by thread CPU.
        environ["mserve.inline"] = threading.current_thread() is self.channel.server.loop_thread
        environ["mserve.reply_early"] = self.reply_early
        if self.channel.shed_next:
            environ["mserve.shed"] = True
        extra = self.channel.environ_extra
        if extra:
            environ.update(extra)
        return environ

    def reply_early(self, status: str, headers: list[tuple[str, str]], body: bytes) -> bool:
        """From another thread, while the app still runs: send this reply now and
        close the connection once the app is done (its own reply is dropped). False
        when the app's reply has already begun (then that one goes out)."""
        if not self._reply_lock.acquire(blocking=False):
            return False  # the app is writing its reply right now
        try:
            if self.wrote_header or self.abandoned:
                return False
            self.abandoned = self.wrote_header = True
            self.close_on_finish = True
            try:
                self.channel.write_soon(closing_reply(self.version, status, headers, body))
            except Exception:  # noqa: BLE001 - the client is gone
                return False
            return True
        finally:
            self._reply_lock.release()

    def write(self, data: bytes) -> None:
        with self._reply_lock:
            if self.abandoned:
                self.content_bytes_written += len(data)  # as if sent: no "too few bytes" warning
                return
            if not self.wrote_header and data and self.complete and self.has_body and self.request.command != "HEAD":
                cl = self.content_length
                if cl is not None and len(data) <= cl:
                    self.wrote_header = True
                    self.content_bytes_written += len(data)
                    self.channel.write_soon(self.build_response_header() + data)
                    return
            super().write(data)


class _DirectReply:
    """Who answers a direct predict (`ServingChannel.serve_direct`): the app, or
    the deadline watcher's early reply (`mserve.transport.wsgi.DeadlineWatch`),
    whichever comes first; the other's reply is dropped."""

    def __init__(self, channel: "ServingChannel"):
        self.channel = channel
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        with self._lock:
            if self._taken:
                return False
            self._taken = True
            return True

    def __call__(self, status: str, headers: list[tuple[str, str]], body: bytes) -> bool:
        """``mserve.reply_early``, from the deadline watcher's thread."""
        if not self.take():
            return False
        channel = self.channel
        try:
            channel.reply_and_close(closing_reply("1.1", status, headers, body))
        except Exception:  # noqa: BLE001 - the client is gone
            return False
        channel.server.pull_trigger()
        return True


class ServingChannel(HTTPChannel):
    task_class = _Task
    error_task_class = _JsonErrorTask
    parser_class = _Parser
    inline_pending = False  # set by ServingServer.add_task: serve on this thread once the read is done
    shed_next = False  # set by ServingServer.add_task: answer the pending request with a fast 503
    head_started = 0.0  # when the first byte of the request head now being read arrived
    fresh = True  # nothing received yet on this connection
    environ_extra: dict | None = None  # per-connection WSGI environ entries (TLS)
    detect_tls = True  # answer a ClientHello with a hint (off where TLS is spoken)

    linger_after = False  # closing after a reply: half-close and drain first (see _half_close)
    half_closed = False
    linger_until = 0.0
    direct_busy = False  # a direct predict of this connection runs: read nothing more until it is answered

    def readable(self) -> bool:
        if self.direct_busy:
            return False
        return True if self.half_closed else super().readable()

    def handle_read(self) -> None:
        if self.half_closed:
            self.drain()
            return
        super().handle_read()
        self.serve_inline()

    def drain(self) -> None:
        """Half-closed: read and drop what the client still sends, until it closes."""
        try:
            data = self.socket.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.handle_close()

    def handle_write(self) -> None:
        # Waitress's handle_write, except for how the connection closes after a
        # reply: gently (_half_close), and only once everything has left.
        if not self.requests:
            flush = self._flush_some
        elif self.total_outbufs_len >= self.adj.send_bytes:
            flush = self._flush_some_if_lockable
        else:
            flush = None
        self._flush_exception(flush)
        if self.close_when_flushed and not self.total_outbufs_len:
            self.close_when_flushed = False
            self.will_close = True
            self.linger_after = True
        if self.will_close and self.all_sent():
            if self.linger_after and not self.half_closed:
                self._half_close()
            else:
                self.handle_close()

    def all_sent(self) -> bool:
        return True

    def _half_close(self) -> None:
        """Stop sending but read (and drop) what the client still sends, for up to
        `_LINGER_SECONDS`: closing with unread input makes the kernel send a reset,
        which can destroy the reply (a 431 or 413 the client is still sending into)
        before the client reads it."""
        self.will_close = False
        self.half_closed = True
        self.linger_until = time.monotonic() + _LINGER_SECONDS
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            self.handle_close()

    def serve_inline(self) -> None:
        # Not from inside received(): it holds requests_lock, which service() takes.
        while self.inline_pending:
            self.inline_pending = False
            server = self.server
            if threading.current_thread() is not server.loop_thread:
                # The loop moved to another thread while we served (a stall): what
                # is left goes to the worker threads like any request.
                server.add_task(self)
                return
            server.inline_since = time.monotonic()
            try:
                self.service()
            finally:
                self.shed_next = False
                if server.loop_thread is threading.current_thread():
                    server.inline_since = 0.0

    def received(self, data: bytes) -> bool:
        if self.fresh and data:
            self.fresh = False
            if self.detect_tls and data.startswith(_TLS_RECORD):
                log.info("client %s started a TLS handshake on the plain-HTTP port", self.addr)
                self.reply_and_close(json_error_reply("400 Bad Request", _TLS_ON_PLAIN_MESSAGE))
                return False
        if self.request is None:
            if self.server.direct is not None and self.serve_direct(data):
                return True
            self.head_started = time.monotonic()
        return super().received(data)

    def serve_direct(self, data: bytes) -> bool:
        """Answer ``data`` here and now when it is one simple predict that may run
        on this thread (`mserve.transport.direct`); False: Waitress takes it."""
        server = self.server
        if (self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed
                or server.draining or server.inline is None or threading.current_thread() is not server.loop_thread):
            return False
        request = direct.parse(data, self.adj.max_request_header_size, server.max_body_bytes)
        if request is None or not server.inline.allows("POST", request.path, len(request.body)):
            return False
        if server.shed is not None and server.shed(len(server.task_dispatcher.queue)):
            return False  # Waitress's path answers the 503 on this thread
        replier = _DirectReply(self)
        peer = {"REMOTE_ADDR": self.addr[0] if self.addr else None, "CONTENT_LENGTH": len(request.body)}
        self.direct_busy = True
        server.direct_served += 1
        server.inline_since = time.monotonic()
        try:
            answer = server.direct(request.path, request.body, request.request_id, peer, replier)
        finally:
            self.direct_busy = False
            if server.loop_thread is threading.current_thread():
                server.inline_since = 0.0
        if answer is None:
            server.direct_served -= 1
            return False  # not a path the app answers this way: nothing was consumed
        if replier.take():
            status_line, headers, reply = answer
            self.send_reply(server.reply_head.build(status_line, headers) + reply)
        return True

    def send_reply(self, payload: bytes) -> None:
        """Send a complete reply: at once from the loop thread when nothing is
        queued before it; what the socket does not take waits in the buffers."""
        server = self.server
        on_loop = threading.current_thread() is server.loop_thread
        if on_loop and not self.total_outbufs_len:
            sent = self.send(payload)
            if sent >= len(payload) or not self.connected:
                return  # all sent, or the client is gone
            payload = payload[sent:]
        self.queue_output(payload)
        if not on_loop:
            server.pull_trigger()

    def reply_and_close(self, payload: bytes) -> None:
        """Queue ``payload`` (a complete reply) and close once it is sent."""
        self.queue_output(payload)
        self.close_when_flushed = True

    def queue_output(self, payload: bytes) -> None:
        """Append ``payload`` to what the loop sends when the socket takes it."""
        with self.outbuf_lock:
            self.outbufs[-1].append(payload)
            self.current_outbuf_count += len(payload)
            self.total_outbufs_len += len(payload)

    def _flush_outbufs_below_high_watermark(self) -> None:
        # A worker thread waits here for the I/O thread to drain a huge reply; the
        # I/O thread itself must not wait for itself. It flushes on its next turn.
        if threading.current_thread() is not self.server.loop_thread:
            super()._flush_outbufs_below_high_watermark()

    def expired(self, now: float, wall: float, limits: ConnectionLimits) -> str | None:
        """Why the maintenance pass should close this connection now, if it should."""
        if self.half_closed:
            return "closed after its reply" if now > self.linger_until else None
        if self.requests or self.direct_busy:
            return None  # a request is being served: the request timeout governs it
        request = self.request
        if request is not None and not request.headers_finished and now - self.head_started > limits.header_timeout:
            return "request head not complete within header_timeout"
        if wall - self.last_activity > limits.idle_timeout:
            return "idle"
        return None

    def evictable(self) -> bool:
        return not (self.requests or self.direct_busy or self.total_outbufs_len or self.will_close)

    def idle_at_stop(self, wall: float) -> bool:
        """Whether a stopping server may close this connection now: nothing of a
        request received (not even unread bytes in the kernel), nothing left to send;
        a connection taken from the backlog gets a moment to send its request."""
        if self.requests or self.direct_busy or self.request is not None or self.total_outbufs_len or self.half_closed:
            return False
        if self.fresh and wall - self.creation_time < _FRESH_GRACE_SECONDS:
            return False
        try:
            pending = self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return True  # reset by the client
        return not pending  # b"": the client closed it; else a request is on its way in


class ServingServer(TcpWSGIServer):
    channel_class = ServingChannel
    balance: ConnectionBalance | None = None
    inline: InlinePolicy | None = None
    shed: Callable[[int], bool] | None = None
    loop_thread: threading.Thread | None = None
    limits: ConnectionLimits = ConnectionLimits()
    max_connections = _DEFAULT_MAX_CONNECTIONS
    max_body_bytes = 0
    inline_since = 0.0  # monotonic start of the inline request running now, else 0
    evicted = 0  # connections closed to make room for new ones
    direct: Callable[..., Any] | None = None  # the app's direct_predict (mserve.transport.direct)
    direct_served = 0  # predicts taken that way
    reply_head: direct.ReplyHead

    def add_task(self, task: Any) -> None:
        # ``task`` is the channel with a complete request at requests[0].
        request = task.requests[0]
        on_loop = threading.current_thread() is self.loop_thread
        if on_loop and not request.error and request.command == "POST":
            if self.shed is not None and self.shed(len(self.task_dispatcher.queue)):
                task.shed_next = True  # answered at once, on this thread
                task.inline_pending = True
                return
            if self.inline is not None and self.inline.allows(request.command, request.path, request.content_length):
                task.inline_pending = True
                return
        super().add_task(task)

    def pull_trigger(self) -> None:
        # The wake-up is for the I/O thread; it needs none from itself (inline
        # requests), as it re-polls every connection after this turn anyway.
        if threading.current_thread() is not self.loop_thread:
            self.trigger.pull_trigger()

    declined = False  # the balance said another worker's turn at the last look
    draining = False  # stopping: no more accepts, every reply closes its connection
    drain_checked = 0.0  # monotonic time of the last pass closing idle connections

    def handle_accept(self) -> None:
        """Accept what the kernel has queued, up to `_ACCEPT_BATCH` per turn of the
        loop (every turn polls every connection: one accept a turn makes a burst of
        n connections cost n turns), while the balance still gives this worker the
        turn; then let the workers that declined look again at once."""
        balance = self.balance
        before = len(self.active_channels)
        for _ in range(_ACCEPT_BATCH):
            count = len(self.active_channels)
            if count >= self.max_connections:
                break
            super().handle_accept()
            if len(self.active_channels) == count:
                break  # nothing more queued (or a connection already gone)
            if balance is not None and not balance.may_accept(len(self.active_channels)):
                break
        if balance is not None and len(self.active_channels) > before:
            balance.ring_others()

    def stop_accepting(self) -> None:
        """On the loop thread: take the connections the kernel has already accepted
        (their requests count as received), then shut the listening socket down,
        which makes the kernel refuse new connections in every process sharing it
        (front-ends inherit one socket), and stop polling it."""
        self.draining = True
        sock = self.socket
        taken = 0
        if sock.fileno() >= 0:  # not already closed (another front-end shut it down: handle_close)
            try:
                sock.setblocking(False)
                while True:
                    try:
                        conn, addr = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # another front-end shut it down first
                    try:
                        self.set_socket_options(conn)
                        self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
                        taken += 1
                    except OSError:
                        conn.close()
            finally:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        wasyncore.dispatcher.close(self)  # this process's descriptor of it
        log.info("stopped accepting connections (%d taken from the backlog); %d open", taken,
                 len(self.active_channels))

    def handle_close(self) -> None:
        # The listening socket hung up: another front-end sharing it is stopping and
        # shut it down. Stop polling it; Waitress's own close would also close the
        # wake-up pipe that this process's stop still needs.
        wasyncore.dispatcher.close(self)

    def close_idle(self) -> None:
        """While draining, at most every 100 ms: close connections with nothing to do."""
        now = time.monotonic()
        if now - self.drain_checked < 0.1:
            return
        self.drain_checked = now
        wall = time.time()
        for channel in list(self.active_channels.values()):
            if channel.idle_at_stop(wall):
                channel.handle_close()

    def unanswered(self) -> int:
        """Connections with a request received (or arriving) and not fully answered."""
        return sum(
            1 for ch in list(self.active_channels.values())
            if ch.requests or ch.direct_busy or ch.request is not None or ch.total_outbufs_len
        )

    def readable(self) -> bool:
        # Called on every turn of the loop, which is when a worker process takes or
        # declines its turn at accepting (see balance.py).
        if not super().readable():
            return False
        self.declined = self.balance is not None and not self.balance.may_accept(len(self.active_channels))
        return not self.declined

    def make_room(self) -> None:
        """At the connection limit, close the longest-idle connections that serve
        nothing right now, a batch at a time (1% of the limit), so a full server
        still takes new clients. Called between turns of the loop: a descriptor
        closed while a turn's poll set is being built could be reused by an accept
        in the same turn and be mistaken for the closed one."""
        if not self.accepting or len(self.active_channels) < self.max_connections:
            return
        excess = len(self.active_channels) - self.max_connections + max(1, self.max_connections // 100)
        candidates = [ch for ch in self.active_channels.values() if ch.evictable()]
        for channel in heapq.nsmallest(excess, candidates, key=lambda ch: ch.last_activity):
            self.evicted += 1
            channel.handle_close()
        if candidates:
            log.info("connection limit %d reached: closed %d idle connection(s)", self.max_connections,
                     min(excess, len(candidates)))

    def maintenance(self, now: float) -> None:
        """Every second: close connections idle past ``idle_timeout``, heads not
        complete within ``header_timeout`` (and, over TLS, handshakes not done within
        ``handshake_timeout``)."""
        monotonic = time.monotonic()
        for channel in list(self.active_channels.values()):
            why = channel.expired(monotonic, now, self.limits)
            if why is not None:
                log.debug("closing connection %s: %s", channel.addr, why)
                channel.will_close = True


def _poll_once(server: ServingServer, map: dict, me: threading.Thread) -> None:
    """One turn of the event loop (Waitress's ``poll2``, with two differences): the
    timeout is chosen after every dispatcher said whether it is readable, so a worker
    whose turn at accepting has just come does not sleep a whole second first; and
    the turn stops as soon as the loop has been handed to another thread."""
    if server.draining:
        server.close_idle()
    else:
        server.make_room()
    pollster = select.poll()
    for fd, obj in list(map.items()):
        flags = 0
        if obj.readable():
            flags |= select.POLLIN | select.POLLPRI
        if obj.writable() and not obj.accepting:
            flags |= select.POLLOUT
        if flags:
            pollster.register(fd, flags)
    try:
        ready = pollster.poll(50 if server.declined or server.draining else 1000)
    except InterruptedError:
        return
    for fd, flags in ready:
        if server.loop_thread is not me:
            return
        obj = map.get(fd)
        if obj is not None:
            wasyncore.readwrite(obj, flags)


class _Bell(wasyncore.file_dispatcher):
    """This worker's end of the balance's bell: being rung only wakes the loop,
    which then asks the balance again whether to accept (see balance.py)."""

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        try:
            os.read(self._fileno, 4096)
        except (BlockingIOError, InterruptedError):
            pass

    def handle_close(self) -> None:
        self.close()


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
    server_class: type[ServingServer] = ServingServer

    def __init__(
        self,
        app: Callable[..., Any],
        sock: socket.socket,
        *,
        threads: int,
        max_body_bytes: int,
        balance: ConnectionBalance | None = None,
        inline: InlinePolicy | None = None,
        limits: ConnectionLimits | None = None,
        shed: Callable[[int], bool] | None = None,
    ):
        limits = limits or ConnectionLimits()
        limits.check()
        max_connections = connection_capacity(limits.max_connections)
        self.socket = sock
        self.app = InFlight(app)
        adj = Adjustments(
            threads=threads,
            # Waitress refuses a Content-Length >= this before reading the body.
            max_request_body_size=max_body_bytes + 1,
            max_request_header_size=limits.max_header_bytes,
            ident="mserve",
            url_scheme=self.scheme,
            channel_timeout=int(max(1, limits.idle_timeout)),
            cleanup_interval=1,
            # The map also holds the listener and the wake-up pipe.
            connection_limit=max_connections + 2,
            outbuf_overflow=1 << 22,
        )
        self._map: dict = {}
        self._dispatcher = ThreadedTaskDispatcher()
        self._dispatcher.set_thread_count(threads)
        sockinfo = (sock.family, sock.type, sock.proto, sock.getsockname())
        self._server = self.server_class(
            self.app, self._map, True, sock, dispatcher=self._dispatcher, adj=adj, bind_socket=False, sockinfo=sockinfo
        )
        self._server.balance = balance
        if balance is not None and balance.bell is not None:
            _Bell(balance.bell, self._map)
        self._server.inline = inline
        self._server.shed = shed
        self._server.limits = limits
        self._server.max_connections = max_connections
        self._server.max_body_bytes = max_body_bytes
        # Waitress wraps the app in a middleware that deletes X-Forwarded-* headers
        # from every request's environ; mserve never reads them, so skip its cost.
        self._server.application = self.app
        self._server.direct = getattr(app, "direct_predict", None)
        self._server.reply_head = direct.ReplyHead(adj.ident)
        self._closed = False
        self._stopping = threading.Event()
        self._thread = self._loop_thread()
        self._watchdog = threading.Thread(target=self._watch, name="mserve-http-watchdog", daemon=True)

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._server.active_channels)

    @property
    def direct_requests(self) -> int:
        """Predicts taken straight from the bytes read (`mserve.transport.direct`)."""
        return self._server.direct_served

    @property
    def evicted(self) -> int:
        """Idle connections closed so far to make room under ``max_connections``."""
        return self._server.evicted

    def _loop_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name=f"mserve-{self.scheme}", daemon=True)

    def _run(self) -> None:
        me = threading.current_thread()
        self._server.loop_thread = me
        while self._map and not self._closed and self._server.loop_thread is me:
            try:
                _poll_once(self._server, self._map, me)
            except BaseException:  # noqa: BLE001 - nothing a request does may end the loop
                log.exception("%s loop: unexpected error (the loop goes on)", self.scheme.upper())

    def _watch(self) -> None:
        """Hand the event loop to a fresh thread when an inline request has held it
        for ``_STALL_SECONDS``: the stalled thread finishes that request, then exits."""
        server = self._server
        while not self._stopping.wait(_STALL_SECONDS / 2):
            started = server.inline_since
            if started and time.monotonic() - started > _STALL_SECONDS and not self._closed:
                fresh = self._loop_thread()
                server.loop_thread = fresh  # from now on the stalled thread is a worker
                server.inline_since = 0.0
                self._thread = fresh
                fresh.start()
                log.warning("a request held the %s I/O thread over %.0f ms; the loop moved to a new thread",
                            self.scheme.upper(), _STALL_SECONDS * 1000)

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
        self._watchdog.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting (the kernel refuses new connections), answer every request
        already received, then close all connections; returns within
        ``drain_timeout`` plus about half a second."""
        if not self._thread.is_alive():
            return
        deadline = time.monotonic() + drain_timeout
        accepting_stopped = threading.Event()

        def stop_accepting() -> None:
            try:
                self._server.stop_accepting()
            finally:
                accepting_stopped.set()

        self._server.trigger.pull_trigger(stop_accepting)
        accepting_stopped.wait(min(drain_timeout, 5.0) + 0.1)
        # Done when every connection is closed: answered ones close after their reply,
        # idle ones are closed by the loop (`close_idle`), and one taken from the
        # backlog still has its grace to send a request, so it keeps the drain open.
        while time.monotonic() < deadline and (self.app.count or self._server.active_channels):
            time.sleep(0.02)
        left = self._server.unanswered() + self.app.count
        if left:
            log.warning("drain timeout (%gs): %d request(s) still unanswered; closing their connections",
                        drain_timeout, left)
        self._stopping.set()
        self._dispatcher.shutdown(cancel_pending=True, timeout=_CLOSE_SECONDS / 2)
        trigger = self._server.trigger
        trigger.pull_trigger(self._close_connections)
        self._thread.join(timeout=_CLOSE_SECONDS / 2)
        if not self._thread.is_alive():
            # A request thread outliving the drain may still wake the loop; let it
            # find a no-op rather than a closed (or reused) file descriptor.
            trigger._physical_pull = lambda: None
            trigger.close()
