"""mserve's own gRPC server: HTTP/2 on one event loop, calls run where they cost least.

grpcio's Python server hands every call from its completion-queue thread to a pool
thread and the reply back, with the GIL changing hands each time: measured on a
2-core machine, its server answering a constant reply cost 400-620 µs of CPU per
call, more than MindSpore Serving's C++ server spends on a whole predict. This server
reads and writes HTTP/2 frames itself (`mserve.transport.grpc_connection`,
`mserve.protocol.http2`) on one thread with `selectors`, and runs each call:

* on that thread, when the inline policy (`mserve.transport.inline`, the same rules
  as REST's) knows the call's predict path to be cheap: a small model's predict is
  then read, run and answered without a thread switch, and its reply leaves in one
  ``send``;
* otherwise in a pool of ``threads`` threads, whose replies come back to the loop
  through a wake-up pipe.

It serves what `mserve.transport.grpc.GrpcTransport` serves (the same servicers,
through `mserve.transport.grpc_calls`), with the same limits (`GrpcLimits`: connections,
idle time, calls per connection, calls in the process) and the same stop (GOAWAY,
then up to the drain time for the calls received). It serves plain TCP; TLS and
``unix:`` addresses are served by grpcio (`serve_grpc` chooses).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import threading
import time
from concurrent import futures
from typing import Any, Callable

from ..protocol import http2 as h2
from ..serving.dataplane import Dataplane
from ..serving.reload import RequestEpochs
from .grpc import TAG, PredictServicer, ReadinessHealth, checked_limits, resolve_for_listening
from .grpc_calls import Aborted, CallContext, method_table
from .grpc_connection import INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, UNKNOWN, H2Connection, Stream
from .grpc_limits import ConnectionWatch, GrpcLimits
from .inline import MAX_BODY_BYTES, InlinePolicy, RusageClock
from .v2_service import InferenceServicer

log = logging.getLogger("mserve.transport.grpc")

_READ_SIZE = 256 * 1024
_MAX_UNSENT = 8 << 20  # stop reading a connection whose client leaves this much unread
_TICK = 0.5  # seconds between idle checks
_STOP_GRACE = 0.1  # after the GOAWAY, for calls already on the wire
_STALL_SECONDS = 0.1  # a call on the loop this long gets the loop moved to a new thread


class _Client:
    """A connection with its socket, as the loop sees it."""

    __slots__ = ("sock", "h2", "reading", "writing", "held", "deferred")

    def __init__(self, sock: socket.socket, connection: H2Connection):
        self.sock = sock
        self.h2 = connection
        self.reading = True
        self.writing = False
        self.held = False  # a stalled loop thread still owns this connection (see _watch)
        self.deferred: list[Callable[[], None]] = []  # replies that came meanwhile


class H2GrpcTransport:
    """One started gRPC endpoint on mserve's own HTTP/2 server; `stop` drains it."""

    scheme = "grpc"

    def __init__(
        self,
        dataplane: Dataplane,
        address: str,
        readiness: Callable[[], tuple[bool, str]],
        epochs: RequestEpochs | None = None,
        max_msg_mb_size: int = 100,
        threads: int = 16,
        reuse_port: bool = False,
        limits: GrpcLimits | None = None,
        inline_max_ms: float = 1.0,
    ):
        self.limits, self.max_connections = checked_limits(address, limits)
        self.address = address
        self.dataplane = dataplane
        self.reuse_port = reuse_port
        self.max_message = max_msg_mb_size * 1024 * 1024
        self.health = ReadinessHealth(readiness)
        epochs = epochs or RequestEpochs()
        self.methods = method_table(PredictServicer(dataplane, epochs),
                                    InferenceServicer(dataplane, readiness, epochs), self.health)
        self.inline = InlinePolicy(inline_max_ms / 1000, dataplane.inline_eligible) if inline_max_ms else None
        self.pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mserve-grpc")
        self.calls = 0  # running or waiting for a thread (max_calls); changed on the loop thread only
        self._watch_limits = ConnectionWatch(self.max_connections, self.limits.max_calls, lambda: self.calls)
        self._listeners: list[socket.socket] = []
        self._clients: dict[int, _Client] = {}
        self._selector = selectors.DefaultSelector()
        self._posted: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._woken = False
        self._wake_lock = threading.Lock()
        self._stopping = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self._serving: _Client | None = None  # the connection whose bytes the loop is handling
        self._handoff = threading.Lock()  # _serving and a client's ``held`` change together
        self.inline_since = 0.0  # when the call running on the loop began (0: none)
        self.port = 0

    @property
    def target(self) -> str:
        host = self.address[: self.address.rfind(":")]
        return f"{host}:{self.port}"

    # ------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Listen and serve; `RuntimeError` ``Serving Error: ...`` when that fails."""
        self._listeners, self.port = bind_listeners(self.address, self.reuse_port)
        for listener in self._listeners:
            self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="mserve-grpc-loop", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch, name="mserve-grpc-watchdog", daemon=True).start()
        self._watch_limits.start()
        log.info("%s server listening on %s", TAG, self.target)

    def refresh_health(self) -> None:
        self.health.refresh()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Health answers NOT_SERVING; the listeners close and every connection gets a
        GOAWAY (new calls are refused, so clients retry them elsewhere); every call
        already received gets up to ``drain_timeout`` seconds to finish."""
        if self._thread is None or not self._running:
            return
        self.health.shut_down()
        self._watch_limits.stop()
        self.post(self._begin_stop)
        deadline = time.monotonic() + drain_timeout
        time.sleep(min(_STOP_GRACE, drain_timeout))
        while self.calls and time.monotonic() < deadline:  # polled: a call pays no wake-up bookkeeping
            time.sleep(0.01)
        if self.calls:
            log.warning("drain timeout (%gs): %d gRPC call(s) still unanswered; closing their connections",
                        drain_timeout, self.calls)
        self.post(self._end)
        self._thread.join(2.0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.dataplane.draining = True

    def _begin_stop(self) -> None:
        self._stopping = True
        for listener in self._listeners:
            self._selector.unregister(listener)
            listener.close()
        self._listeners = []
        for client in list(self._clients.values()):
            client.h2.go_away()
            self._flush(client)

    def _end(self) -> None:
        self._running = False
        for client in list(self._clients.values()):
            self._close(client)

    # ------------------------------------------------------------ the event loop

    def post(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the loop thread (from any thread)."""
        self._posted.append(work)
        if not self._woken:
            self._woken = True
            with self._wake_lock:
                if self._wake_write < 0:
                    return  # the loop has ended
                try:
                    os.write(self._wake_write, b"\0")
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already

    def _loop(self) -> None:
        me = threading.current_thread()
        self._loop_thread = me
        next_tick = time.monotonic() + _TICK
        while self._running and self._loop_thread is me:
            try:
                events = self._selector.select(_TICK)
            except OSError:  # pragma: no cover - a descriptor closed under select
                continue
            for key, mask in events:
                client = key.data
                if client is None:
                    if key.fileobj == self._wake_read:
                        self._run_posted()
                    else:
                        self._accept(key.fileobj)
                    continue
                if client.held:
                    continue
                if mask & selectors.EVENT_READ:
                    self._read(client)
                    if self._loop_thread is not me:
                        return  # a call stalled this thread and the loop moved on (_watch)
                if mask & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                    self._flush(client)
            if self._posted:
                self._run_posted()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK
                self._close_idle(now)
        if self._loop_thread is not me:
            return
        self._watchdog_stop.set()
        self._selector.close()
        with self._wake_lock:  # a late post (a health update, say) must not write to a reused descriptor
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_write = -1

    def _run_posted(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False
        posted = self._posted
        while posted:
            work = posted.popleft()
            try:
                work()
            except Exception:  # noqa: BLE001 - the loop must go on
                log.exception("gRPC event loop task failed")

    def _accept(self, listener: Any) -> None:
        for _ in range(64):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: keep serving the others
                log.warning("gRPC accept failed: %s", exc)
                return
            if len(self._clients) >= self.max_connections or self._stopping:
                sock.close()  # as grpcio past grpc.max_allowed_incoming_connections
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = (f"ipv6:[{address[0]}]:{address[1]}" if sock.family == socket.AF_INET6
                    else f"ipv4:{address[0]}:{address[1]}")
            connection = H2Connection(self, peer, self.limits.max_streams_per_connection, self.max_message)
            connection.fileno = sock.fileno()
            client = _Client(sock, connection)
            self._clients[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ, client)
            self._flush(client)  # the server's SETTINGS

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        if not data:
            self._close(client)
            return
        with self._handoff:
            self._serving = client
        try:
            client.h2.received(data)
        except h2.ProtocolViolation as exc:
            log.info("gRPC connection from %s broke HTTP/2: %s", client.h2.peer, exc)
            client.h2.go_away(exc.code, str(exc))
            self._flush(client)
            self._close(client)
            return
        except Exception:  # noqa: BLE001 - never let one connection stop the loop
            log.exception("gRPC connection from %s failed", client.h2.peer)
            client.h2.go_away(h2.INTERNAL_ERROR, "internal error")
            self._flush(client)
            self._close(client)
            return
        finally:
            with self._handoff:
                self._serving = None
                replaced = client.held
        if replaced:  # this thread stalled in a call and was replaced: hand the connection back
            self.post(lambda: self._resume(client))
            return
        self._flush(client)

    # ------------------------------------------------------------ a call that holds the loop

    def _watch(self) -> None:
        """Hand the event loop to a fresh thread when a call run on it has held it for
        ``_STALL_SECONDS`` (the inline policy then sends its path to the threads): the
        stalled thread finishes that connection's work, hands it back, and exits."""
        while not self._watchdog_stop.wait(_STALL_SECONDS / 2):
            with self._handoff:
                started, client = self.inline_since, self._serving
                if not started or time.monotonic() - started <= _STALL_SECONDS or client is None \
                        or not self._running:
                    continue
                client.held = True  # the fresh loop leaves it alone until _resume
                self.inline_since = 0.0
                fresh = threading.Thread(target=self._loop, name="mserve-grpc-loop", daemon=True)
                self._loop_thread = fresh
                self._thread = fresh
            self.post(lambda: self._hold(client))
            fresh.start()
            log.warning("a gRPC call held the event loop over %.0f ms; the loop moved to a new thread",
                        _STALL_SECONDS * 1000)

    def _hold(self, client: _Client) -> None:
        if client.held and client.sock.fileno() >= 0:
            self._selector.unregister(client.sock)
            client.reading = client.writing = False

    def _resume(self, client: _Client) -> None:
        client.held = False
        if client.sock.fileno() < 0:
            return
        if not client.reading and not client.writing:
            client.reading = True
            self._selector.register(client.sock, selectors.EVENT_READ, client)
        deferred, client.deferred = client.deferred, []
        for work in deferred:
            work()
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        output = client.h2.output
        if output:
            try:
                sent = client.sock.send(output)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(client)
                return
            del output[:sent]
        self._watch_socket(client)

    def _watch_socket(self, client: _Client) -> None:
        if client.sock.fileno() < 0:
            return
        unsent = len(client.h2.output)
        reading, writing = unsent < _MAX_UNSENT, unsent > 0
        if (reading, writing) != (client.reading, client.writing):
            client.reading, client.writing = reading, writing
            events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if writing else 0)
            if events:
                self._selector.modify(client.sock, events, client)
            else:  # pragma: no cover - unsent data always means writing
                self._selector.unregister(client.sock)

    def _close(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd < 0:
            return
        self._clients.pop(fd, None)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        client.h2.closed()

    def _close_idle(self, now: float) -> None:
        limit = self.limits.idle_timeout
        for client in list(self._clients.values()):
            connection = client.h2
            if connection.idle() and now - connection.last_active >= limit and not client.held:
                connection.go_away(h2.NO_ERROR, "idle")
                self._flush(client)
                self._close(client)

    # ------------------------------------------------------------ calls

    def start_call(self, connection: H2Connection, call: Stream, message: bytes) -> None:
        """Run a call whose request message has arrived (on the loop thread)."""
        if self.calls >= self.limits.max_calls:
            connection.fail(call, RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
            return
        method = call.method
        assert method is not None and call.context is not None
        if method.streaming:
            self._start_stream(connection, call, message)
            return
        if method.inline_path is not None and self.inline is not None and len(message) <= MAX_BODY_BYTES:
            try:
                request = method.decode(message)
            except Exception:  # noqa: BLE001 - a message that does not parse
                connection.fail(call, INTERNAL, "the request message does not parse as "
                                f"{call.path.rsplit('/', 1)[-1]}'s request")
                return
            path = method.inline_path(request)
            if self.inline.allows("POST", path, len(message)):
                self._run_inline(connection, call, request, path)
                return
            self._submit(connection, call, lambda: request, path)
            return
        self._submit(connection, call, lambda: method.decode(message), None)

    def _run_inline(self, connection: H2Connection, call: Stream, request: Any, path: str) -> None:
        assert self.inline is not None
        self._enter()
        self.inline_since = time.monotonic()
        try:
            before = RusageClock.sample()
            started = time.perf_counter()
            reply, code, details = self._invoke(call, request)
            wall = time.perf_counter() - started
            if wall <= self.inline.max_seconds:  # quick in every sense: its wall time bounds its CPU time
                self.inline.observe(path, wall, wall, 0.0)
            else:
                self.inline.observe(path, *RusageClock.costs(before, RusageClock.sample(), wall))
            connection.reply(call, reply, code, details)
        finally:
            self.inline_since = 0.0
            if self._loop_thread is threading.current_thread():
                self._leave()
            else:
                self.post(self._leave)  # the count belongs to the loop thread

    def _submit(self, connection: H2Connection, call: Stream, request: Callable[[], Any], path: str | None) -> None:
        self._enter()

        def run() -> None:
            try:
                if call.context is not None and call.context.cancelled:
                    self.post(self._leave)
                    return  # the client gave up while the call waited for a thread
                cpu = time.thread_time()
                try:
                    decoded = request()
                except Exception:  # noqa: BLE001 - a message that does not parse
                    answer: tuple[bytes | None, int, str] = (
                        None, INTERNAL, f"the request message does not parse as {call.path.rsplit('/', 1)[-1]}'s "
                        "request")
                else:
                    answer = self._invoke(call, decoded)
                if path is not None and self.inline is not None:
                    self.inline.observe(path, time.thread_time() - cpu)  # what the policy learns from
            except BaseException:  # noqa: BLE001 - still answer, and free the slot
                log.exception("gRPC call %s failed", call.path)
                answer = (None, INTERNAL, "internal error")

            def deliver() -> None:
                self._leave()
                self._on_connection(connection, lambda: connection.reply(call, *answer))

            self.post(deliver)

        try:
            self.pool.submit(run)
        except RuntimeError:  # the pool is shut down: the server is stopping
            self._leave()
            connection.fail(call, UNAVAILABLE, "the server is stopping")

    def _invoke(self, call: Stream, request: Any) -> tuple[bytes | None, int, str]:
        """Call the servicer: the reply message, or None with a status code and text."""
        method, context = call.method, call.context
        assert method is not None and context is not None
        try:
            reply = method.call(request, context)
        except Aborted as exc:
            return None, exc.code, exc.details
        except Exception as exc:  # noqa: BLE001 - as grpcio: UNKNOWN, and the server keeps serving
            log.exception("gRPC method %s raised", call.path)
            return None, UNKNOWN, f"Exception calling application: {exc}"
        if context.code:
            return None, context.code, context.details
        try:
            return method.encode(reply), 0, ""
        except Exception:  # noqa: BLE001
            log.exception("gRPC method %s returned a reply that does not serialize", call.path)
            return None, INTERNAL, "the reply could not be serialized"

    def _start_stream(self, connection: H2Connection, call: Stream, message: bytes) -> None:
        """A server-streaming call (health Watch): its messages may come from any thread."""
        method, context = call.method, call.context
        assert method is not None and context is not None
        try:
            request = method.decode(message)
        except Exception:  # noqa: BLE001
            connection.fail(call, INTERNAL, "the request message does not parse")
            return

        def send(reply: Any) -> None:
            def deliver() -> None:
                if reply is None:
                    connection.finish(call, 0, "")
                else:
                    connection.send_message(call, reply.SerializeToString())

            self.post(lambda: self._on_connection(connection, deliver))

        try:
            method.call(request, context, send_response_callback=send)
        except Aborted as exc:
            connection.fail(call, exc.code, exc.details)
        except Exception as exc:  # noqa: BLE001
            log.exception("gRPC method %s raised", call.path)
            connection.fail(call, UNKNOWN, f"Exception calling application: {exc}")

    def _on_connection(self, connection: H2Connection, work: Callable[[], None]) -> None:
        """Run ``work`` (a reply) on ``connection`` and send it, on the loop thread;
        later if a stalled thread still holds the connection."""
        client = self._clients.get(connection.fileno)
        if client is None or client.h2 is not connection:
            work()  # the connection is gone: the work finds its call closed and sends nothing
            return
        if client.held:
            client.deferred.append(work)
            return
        work()
        self._flush(client)

    def _enter(self) -> None:
        self.calls += 1

    def _leave(self) -> None:
        self.calls -= 1


def bind_listeners(address: str, reuse_port: bool) -> tuple[list[socket.socket], int]:
    """Listening sockets for every address ``host`` resolves to (one port for all:
    the first bound picks it when 0 is asked), as grpcio binds; ``Serving Error: ...``
    when none binds."""
    failed, infos = resolve_for_listening(address)
    listeners: list[socket.socket] = []
    port = int(address.rpartition(":")[2])
    why = ""
    seen = set()
    for family, kind, proto, _, sockaddr in infos:
        if (family, sockaddr[0]) in seen:
            continue
        seen.add((family, sockaddr[0]))
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and sockaddr[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" takes IPv4 too
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            why = why or f": {exc.strerror or exc}"
            continue
        port = sock.getsockname()[1]
        listeners.append(sock)
    if not listeners:
        raise RuntimeError(f"{failed}{why}")
    return listeners, port
