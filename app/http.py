"""The WSGI app: the predict path, and Flask for everything else.

Every POST is a predict call. It goes straight from WSGI to the predict handler:
Flask's request/response machinery cost as much as the whole predict pipeline for a
small model (benchmarks/bench_http_stack.py), and the predict path needs none of
it. Everything else (405 for non-POST predict URLs, the GET endpoints) is the Flask
app. The body is read through `read_body`, which refuses an over-limit body from its
Content-Length (or, when chunked, as soon as it crosses the limit), so it is never
buffered whole first.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from .codec import dumps
from .errors import PayloadTooLarge
from .predict import PredictHandler

access_log = logging.getLogger("mserve.access")

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


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
            500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}


class MserveApp:
    """The WSGI callable: POST -> the predict handler, anything else -> Flask."""

    def __init__(self, handler: PredictHandler, flask_app: Flask, max_body_bytes: int):
        self.handler = handler
        self.flask = flask_app
        self.max_body_bytes = max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ["REQUEST_METHOD"] != "POST":
            return self.flask(environ, start_response)
        started = time.perf_counter()
        path = environ.get("PATH_INFO") or "/"
        headers = [("Content-Type", "application/json")]
        try:
            body = read_body(environ, self.max_body_bytes)
        except PayloadTooLarge as exc:
            # No "Connection: close" here: Waitress refuses hop-by-hop headers from
            # the app (a 500); the body was read, so the connection stays usable.
            status, reply = exc.status, dumps({"error_msg": exc.message})
        except Exception:  # the client went away mid-body, or the stream broke
            logging.getLogger("mserve.http").warning("reading the request body failed", exc_info=True)
            status, reply = 400, dumps({"error_msg": "Parse request failed: the request body could not be read"})
        else:
            status, reply, extra = self.handler.handle(path, body)
            headers.extend(extra.items())
        headers.append(("Content-Length", str(len(reply))))
        start_response(f"{status} {_REASONS.get(status, 'Error')}", headers)
        access_log.info("POST %s %d %.2fms", path, status, (time.perf_counter() - started) * 1e3)
        return [reply]


def create_app(handler: PredictHandler, max_body_bytes: int) -> MserveApp:
    """The WSGI app serving ``handler``'s servables."""
    return MserveApp(handler, create_flask_app(), max_body_bytes)


def create_flask_app() -> Flask:
    """The non-predict side: 405 on predict URLs, and the GET endpoints."""
    app = Flask("mserve")

    def not_post(path: str = "") -> Response:
        response = error_response(405, "http message only support POST right now")
        response.headers["Allow"] = "POST"
        return response

    methods = ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app.add_url_rule("/", "predict_root", not_post, methods=methods)
    app.add_url_rule("/<path:path>", "predict", not_post, methods=methods)

    @app.errorhandler(Exception)
    def any_error(exc: Exception) -> Response:  # JSON always, never a stack trace
        if isinstance(exc, HTTPException):
            return error_response(exc.code or 500, exc.description or exc.name)
        logging.getLogger("mserve.http").exception("unhandled error")
        return error_response(500, "internal server error, see the server log")

    return app

