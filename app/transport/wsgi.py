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

import logging
from http import HTTPStatus
import time
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from ..ops.access_log import current_request_id, log_request, request_id
from ..protocol.codec import dumps
from ..errors import PayloadTooLarge
from .inline import InlinePolicy
from ..ops.metrics import RequestMetrics
from ..serving.dataplane import PredictHandler
from ..serving.reload import RequestEpochs

_CHUNK = 1 << 16


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


# WSGI status lines, built once from the standard library's table.
_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


class MserveApp:
    """The WSGI callable: POST -> the predict handler, anything else -> Flask.

    ``state`` is the server's state (`mserve.server._State`): readiness, the request
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

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        rid = request_id(environ)
        token = current_request_id.set(rid)
        try:
            if environ["REQUEST_METHOD"] != "POST":
                return self._other(environ, start_response, rid, started)
            return self._predict(environ, start_response, rid, started)
        finally:
            current_request_id.reset(token)

    def _predict(self, environ: dict[str, Any], start_response: Any, rid: str, started: float) -> Any:
        path = environ.get("PATH_INFO") or "/"
        cpu_started = time.thread_time() if self.inline is not None else 0.0
        headers = [("Content-Type", "application/json"), ("X-Request-ID", rid)]
        try:
            body = read_body(environ, self.max_body_bytes)
        except PayloadTooLarge as exc:
            # No "Connection: close" here: Waitress refuses hop-by-hop headers from
            # the app (a 500); the body was read, so the connection stays usable.
            status, reply = exc.status, dumps({"error_msg": exc.message})
        except Exception:  # the client went away mid-body, or the stream broke
            logging.getLogger("mserve.transport.wsgi").warning("reading the request body failed", exc_info=True)
            status, reply = 400, dumps({"error_msg": "Parse request failed: the request body could not be read"})
        else:
            epoch = self.epochs.enter()
            try:
                status, reply, extra = self.handler.handle(path, body)
            finally:
                self.epochs.leave(epoch)
            headers.extend(extra.items())
        headers.append(("Content-Length", str(len(reply))))
        start_response(_STATUS_LINES.get(status) or f"{status} Error", headers)
        elapsed = time.perf_counter() - started
        inline = environ.get("mserve.inline", False)
        if self.inline is not None and status != 404:  # 404s would let clients fill its table
            self.inline.observe(path, time.thread_time() - cpu_started, elapsed if inline else None)
        self.metrics.observe(path, status, elapsed, inline)
        log_request("POST", path, status, elapsed, rid, environ, len(reply))
        return [reply]

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
    handler: PredictHandler, max_body_bytes: int, state: Any = None, inline: InlinePolicy | None = None
) -> MserveApp:
    """The WSGI app serving ``handler``'s servables; ``state`` (the server's, by
    default) answers readiness and the metadata endpoints; ``inline`` learns what
    predicts cost (the transport asks it which may run on its I/O thread)."""
    if state is None:
        from .. import server

        state = server._state
    return MserveApp(handler, create_flask_app(state), max_body_bytes, state, inline)


def create_flask_app(state: Any = None) -> Flask:
    """The non-predict side: the GET endpoints, and 405 on predict URLs."""
    from ..ops.endpoints import create_blueprint, is_get_path

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
        logging.getLogger("mserve.transport.wsgi").exception("unhandled error")
        return error_response(500, "internal server error, see the server log")

    return app


def method_not_allowed() -> Response:
    """A predict URL asked with anything but POST (PROTOCOL.md section 1)."""
    response = error_response(405, "http message only support POST right now")
    response.headers["Allow"] = "POST"
    return response
