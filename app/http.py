"""The Flask app: routes HTTP onto the predict handler.

Any POST that is not another endpoint is a predict call; anything else on such a
URL is answered 405 with MindSpore Serving's message. The body is read through
`read_body`, which refuses an over-limit body from its Content-Length (or, when
chunked, as soon as it crosses the limit), so it is never buffered whole first.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Flask, Response, request
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


def create_app(handler: PredictHandler, max_body_bytes: int) -> Flask:
    """The WSGI app serving ``handler``'s servables."""
    app = Flask("mserve")
    app.config["MAX_CONTENT_LENGTH"] = None  # read_body enforces the limit itself

    def predict(path: str = "") -> Response:
        started = time.perf_counter()
        full_path = "/" + path
        if request.method != "POST":
            response = error_response(405, "http message only support POST right now")
            response.headers["Allow"] = "POST"
        else:
            try:
                body = read_body(request.environ, max_body_bytes)
            except PayloadTooLarge as exc:
                response = error_response(exc.status, exc.message)
                response.headers["Connection"] = "close"
            else:
                status, reply, headers = handler.handle(full_path, body)
                response = json_response(status, reply, headers)
        access_log.info(
            "%s %s %d %.2fms", request.method, full_path, response.status_code, (time.perf_counter() - started) * 1e3
        )
        return response

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app.add_url_rule("/", "predict_root", predict, methods=methods)
    app.add_url_rule("/<path:path>", "predict", predict, methods=methods)

    @app.errorhandler(Exception)
    def any_error(exc: Exception) -> Response:  # JSON always, never a stack trace
        if isinstance(exc, HTTPException):
            return error_response(exc.code or 500, exc.description or exc.name)
        logging.getLogger("mserve.http").exception("unhandled error")
        return error_response(500, "internal server error, see the server log")

    return app

