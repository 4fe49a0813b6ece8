"""The WSGI app: the predict path, and Flask for everything else.

Every POST is a predict call. It goes straight from WSGI to the predict handler:
Flask's request/response machinery cost as much as the whole predict pipeline for a
small model (benchmarks/bench_http_stack.py), and the predict path needs none of
it. Everything else (405 for non-POST predict URLs, the GET endpoints of
`mserve.ops.endpoints`) is the Flask app. The body is read through `read_body`, which
refuses an over-limit body from its Content-Length (or, when chunked, as soon as it
crosses the limit), so it is never buffered whole first.

Around both, `MserveApp` gives every request an id (``X-Request-ID``, echoed), one
access-log record (`mserve.ops.access_log`), and, for predicts, the request metrics and
an epoch in `RequestEpochs` (so hot reload knows when a retired version is idle).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..ops.access_log import checked_request_id, current_request_id, log_request, request_id
from ..protocol.codec import dumps
from ..errors import PayloadTooLarge
from .inline import InlinePolicy, ThreadClock
from ..ops.metrics import RequestMetrics
from ..serving.dataplane import INTERNAL_MESSAGE, PredictHandler
from ..serving.reload import RequestEpochs
from .memory import RELEASE_AFTER_BYTES, release_memory
from . import v2_routes  # the Open Inference Protocol's /v2 routes

_CHUNK = 1 << 16
log = logging.getLogger("mserve.transport.wsgi")


def request_path(environ: dict[str, Any]) -> str:
    """The request's path as text. WSGI hands it over as latin-1 decoded bytes
    (PEP 3333); URLs carry UTF-8, so a servable named ``数字`` arrives as mojibake
    unless decoded again. Bytes that are not UTF-8 stay as they came."""
    raw = environ.get("PATH_INFO") or "/"
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, or `PayloadTooLarge` once it is known to exceed ``limit``."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size > limit:
            raise PayloadTooLarge(f"http message is bigger than {limit}")
        if size >= 0:
            return stream.read(size)
    parts, total = [], 0
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"http message is bigger than {limit}")
        parts.append(chunk)


def json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status, mimetype="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, dumps({"error_msg": message}), headers)


class DeadlineWatch:
    """Fires a request's deadline action when the request outlives its deadline.

    Python cannot stop a stage that is still running; what the client is owed is a
    reply at the deadline. A request arms its deadline before the handler runs and
    disarms it after (a dict insert and delete); a watcher thread, started on first
    use, fires those past their deadline: the transport then sends the 504 at once
    and drops the late reply (`mserve.transport.http._Task.reply_early`).

    Every request gets the same timeout (``horizon``), so insertion order is
    deadline order, and no deadline armed later can come sooner than ``horizon``
    from now: the watcher sleeps until the oldest armed deadline, or ``horizon``
    when none is armed, and wakes no more often than that (a thread that woke
    every few milliseconds would take the GIL from the I/O thread as often).
    """

    def __init__(self, horizon: float):
        self.horizon = horizon
        self._armed: dict[int, tuple[float, Any]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, deadline: float, fire: Any) -> int:
        token = next(self._tokens)
        self._armed[token] = (deadline, fire)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="mserve-deadlines", daemon=True)
                    self._thread.start()
        return token

    def disarm(self, token: int) -> None:
        self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            wake = now + self.horizon
            for token, (deadline, fire) in list(self._armed.items()):
                if deadline > now:
                    wake = deadline
                    break
                if self._armed.pop(token, None) is not None:
                    try:
                        fire()
                    except Exception:  # noqa: BLE001 - the watcher must go on
                        log.exception("sending a deadline reply failed")
            time.sleep(max(wake - time.monotonic(), 0.001))


# WSGI status lines, built once from the standard library's table.
_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


class MserveApp:
    """The WSGI callable: POST -> the predict handler, anything else -> Flask.

    ``state`` is the server's state (`mserve.runtime.runtime.Runtime`): readiness, the request
    epochs, and what the GET endpoints describe.
    """

    def __init__(
        self,
        handler: PredictHandler,
        flask_app: Flask,
        max_body_bytes: int,
        state: Any = None,
        inline: InlinePolicy | None = None,
    ):
        self.handler = handler
        self.flask = flask_app
        self.max_body_bytes = max_body_bytes
        self.state = state
        self.inline = inline
        self.epochs: RequestEpochs = state.epochs if state is not None else RequestEpochs()
        self.metrics = RequestMetrics(handler.registry.servables)
        self.deadlines = DeadlineWatch(handler.request_timeout)
        self.clock = ThreadClock()  # what a predict cost its thread (InlinePolicy)
        self.v2 = v2_routes.V2Routes(self, read_body)  # /v2/...: the Open Inference Protocol

    def _arm_deadline(self, reply_early: Any, rid: str) -> int | None:
        """Have the deadline reply sent when the handler is still busy at the
        deadline (transports that can send one give ``reply_early``)."""
        if reply_early is None:
            return None
        handler = self.handler

        def fire() -> None:
            status, body, extra = handler.deadline_reply()
            headers = [("Content-Type", "application/json"), ("X-Request-ID", rid), *extra.items()]
            if reply_early(_STATUS_LINES.get(status) or f"{status} Error", headers, body):
                log.warning("request %s still running at its deadline (%gs): answered %d", rid,
                            handler.request_timeout, status)

        return self.deadlines.arm(time.monotonic() + handler.request_timeout, fire)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        rid = request_id(environ)
        token = current_request_id.set(rid)
        try:
            path = environ.get("PATH_INFO") or "/"
            if v2_routes.serves(path):  # the Open Inference Protocol (mserve.transport.v2_routes)
                return self.v2(environ, start_response, request_path(environ), rid, started)
            if environ["REQUEST_METHOD"] != "POST":
                return self._other(environ, start_response, rid, started)
            return self._predict(environ, start_response, rid, started)
        finally:
            current_request_id.reset(token)

    def _predict(self, environ: dict[str, Any], start_response: Any, rid: str, started: float) -> Any:
        path = request_path(environ)
        inline = environ.get("mserve.inline", False)
        if environ.get("mserve.shed"):
            # Over capacity (the transport counted the queue): answer at once.
            status, reply, extra = self.handler.shed_reply()  # a 503: the inline policy does not learn from it
            status_line, headers = self._finish(path, status, reply, extra, rid, started, inline, None, environ)
        else:
            try:
                body = read_body(environ, self.max_body_bytes)
            except PayloadTooLarge as exc:
                # No "Connection: close" here: Waitress refuses hop-by-hop headers from
                # the app (a 500); the body was read, so the connection stays usable.
                status, reply, extra = exc.status, dumps({"error_msg": exc.message}), {}
            except Exception:  # the client went away mid-body, or the stream broke
                log.warning("reading the request body failed", exc_info=True)
                status, reply, extra = 400, dumps(
                    {"error_msg": "Parse request failed: the request body could not be read"}), {}
            else:
                status_line, headers, reply = self.serve_predict(
                    path, body, rid, started, inline, environ.get("mserve.reply_early"), environ)
                start_response(status_line, headers)
                return [reply]
            clock = self.clock.sample() if self.inline is not None else None
            status_line, headers = self._finish(path, status, reply, extra, rid, started, inline, clock, environ)
        start_response(status_line, headers)
        return [reply]

    def direct_predict(
        self, path: str, body: bytes, given_id: str | None, peer: dict[str, Any], reply_early: Any
    ) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """A predict the transport parsed itself (`mserve.transport.direct`), run on
        its I/O thread: the status line, headers and body to send, or None for a
        path it does not answer this way (``/v2``). ``peer`` holds the environ entries
        the access log reads (``REMOTE_ADDR``, ``CONTENT_LENGTH``)."""
        if v2_routes.serves(path):
            return None
        started = time.perf_counter()
        rid = checked_request_id(given_id)
        token = current_request_id.set(rid)
        try:
            return self.serve_predict(path, body, rid, started, True, reply_early, peer)
        finally:
            current_request_id.reset(token)

    def serve_predict(
        self, path: str, body: bytes, rid: str, started: float, inline: bool, reply_early: Any,
        environ: dict[str, Any],
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        """Run one predict whose body has been read: deadline, request epoch, the
        handler, then `_finish`."""
        clock = self.clock.sample() if self.inline is not None else None
        watch = self._arm_deadline(reply_early, rid)
        epoch = self.epochs.enter()
        try:
            status, reply, extra = self.handler.handle(path, body)
        except BaseException:  # noqa: BLE001 - the handler never raises; if it does, still reply
            log.exception("predict %s failed", path)
            status, reply, extra = 500, dumps({"error_msg": INTERNAL_MESSAGE}), {}
        finally:
            self.epochs.leave(epoch)
            if watch is not None:
                self.deadlines.disarm(watch)
        status_line, headers = self._finish(path, status, reply, extra, rid, started, inline, clock, environ)
        if len(body) >= RELEASE_AFTER_BYTES:
            release_memory(collect=status >= 400)
        return status_line, headers, reply

    def _finish(
        self, path: str, status: int, reply: bytes, extra: dict[str, str], rid: str, started: float, inline: bool,
        clock: tuple[float, float] | None, environ: dict[str, Any],
    ) -> tuple[str, list[tuple[str, str]]]:
        """What every predict reply gets: its headers, what it cost taught to the
        inline policy, the request metrics and the access-log record."""
        headers = [("Content-Type", "application/json"), ("X-Request-ID", rid), *extra.items(),
                   ("Content-Length", str(len(reply)))]
        elapsed = time.perf_counter() - started
        if clock is not None and status not in (404, 503):  # 404s would let clients fill its table
            on_cpu, queued = self.clock.sample()
            cpu = on_cpu - clock[0]
            self.inline.observe(path, cpu, elapsed if inline else None, elapsed - cpu - (queued - clock[1]))
        self.metrics.observe(path, status, elapsed, inline)
        log_request("POST", path, status, elapsed, rid, environ, len(reply))
        return _STATUS_LINES.get(status) or f"{status} Error", headers

    def _other(self, environ: dict[str, Any], start_response: Any, rid: str, started: float) -> Any:
        seen: list[int] = []

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen.append(int(status.split(" ", 1)[0]))
            headers.append(("X-Request-ID", rid))
            return start_response(status, headers, exc_info)

        result = self.flask(environ, respond)
        path = environ.get("PATH_INFO") or "/"
        log_request(environ["REQUEST_METHOD"], path, seen[-1] if seen else 0, time.perf_counter() - started, rid,
                    environ, None)
        return result


def create_app(
    handler: PredictHandler, max_body_bytes: int, state: Any, inline: InlinePolicy | None = None
) -> MserveApp:
    """The WSGI app serving ``handler``'s servables; ``state`` (the server's
    `mserve.runtime.runtime.Runtime`) answers readiness and the metadata endpoints;
    ``inline`` learns what predicts cost (the transport asks it which may run on its
    I/O thread)."""
    return MserveApp(handler, create_flask_app(state), max_body_bytes, state, inline)


def create_flask_app(state: Any = None) -> Flask:
    """The non-predict side: the GET endpoints, and 405 on predict URLs."""
    from ..ops.endpoints import create_blueprint, is_get_path, method_not_allowed

    app = Flask("mserve")
    if state is not None:
        app.register_blueprint(create_blueprint(state))

    def not_post(path: str = "") -> Response:
        if state is not None and is_get_path(request.path):
            response = error_response(405, f"method {request.method} not allowed, {request.path} answers GET")
            response.headers["Allow"] = "GET, HEAD"
            return response
        return method_not_allowed()

    methods = ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app.add_url_rule("/", "predict_root", not_post, methods=methods)
    app.add_url_rule("/<path:path>", "predict", not_post, methods=methods)

    @app.errorhandler(Exception)
    def any_error(exc: Exception) -> Response:  # JSON always, never a stack trace
        if isinstance(exc, HTTPException):
            response = error_response(exc.code or 500, exc.description or exc.name)
            if exc.code == 405 and getattr(exc, "valid_methods", None):
                response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
            return response
        log.exception("unhandled error")
        return error_response(500, INTERNAL_MESSAGE)

    return app
