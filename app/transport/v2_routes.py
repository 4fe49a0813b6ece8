"""The Open Inference Protocol's REST routes (``/v2/...``) beside MindSpore's, on one port.

    GET  /v2                                          server metadata
    GET  /v2/health/live, /v2/health/ready            200, or 503 while not ready
    GET  /v2/models/{model}[/versions/{v}]            model metadata
    GET  /v2/models/{model}[/versions/{v}]/ready      200, 404 unknown, 503 loading
    POST /v2/models/{model}[/versions/{v}]/infer      inference
    POST /v2/repository/index                         the models served (Triton's extension)

`mserve.transport.wsgi.MserveApp` hands every ``/v2`` request here. Infer requests
get what MindSpore's predict requests get from the same app: the request id
(``X-Request-ID``), the access log, the request metrics (labelled with the servable
and method), admission and shedding (503), the deadline (504 at the deadline), the
request epochs of hot reload, and the inline policy (unbatched methods only). Errors
are ``{"error": "..."}`` with the status saying what kind.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from typing import Any, Callable

import orjson

from ..errors import BadRequest, ServingError
from ..ops.openapi import mserve_version
from ..protocol import v2_rest
from ..protocol.v2_tensors import OutputError
from ..serving import v2_models
from ..serving.dataplane import INTERNAL_MESSAGE, LOADING_MESSAGE
from .memory import RELEASE_AFTER_BYTES, release_memory

log = logging.getLogger("mserve.transport.v2_routes")

SERVER_NAME = "mserve"
EXTENSIONS = ["binary_tensor_data", "model_repository(index)"]
_STATUS_LINES = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


def serves(path: str) -> bool:
    """Whether ``path`` is one of this protocol's."""
    return path == "/v2" or path.startswith("/v2/")


class V2Routes:
    """The ``/v2`` routes of one `MserveApp` (whose handler, metrics, deadlines,
    epochs, inline policy and limits they share)."""

    def __init__(self, app: Any, read_body: Callable[[dict[str, Any], int], bytes]):
        self.app = app
        self.read_body = read_body
        self.inference = v2_models.V2Inference(app.handler)
        self.version = mserve_version()

    # ------------------------------------------------------------------ dispatch

    def __call__(self, environ: dict[str, Any], start_response: Any, path: str, rid: str, started: float) -> Any:
        method = environ["REQUEST_METHOD"]
        parts = path.rstrip("/").split("/")[2:]  # after "", "v2"
        headers: dict[str, str] = {}
        try:
            if method == "POST" and parts == ["repository", "index"]:
                status, reply = self._index()
            elif parts[:1] == ["models"] and len(parts) >= 2 and parts[-1] == "infer":
                self._allow(method, "POST")
                return self._infer(environ, start_response, path, parts[1:-1], rid, started)
            else:
                self._allow(method, "GET", "HEAD")
                status, reply = self._get(parts)
        except _NotAllowed as exc:
            status, reply, headers = 405, v2_rest.error_body(exc.message), {"Allow": exc.allow}
        except ServingError as exc:
            status, reply = exc.status, v2_rest.error_body(exc.message)
        except Exception:  # noqa: BLE001 - a reply, never a stack trace
            log.exception("%s %s failed", method, path)
            status, reply = 500, v2_rest.error_body(INTERNAL_MESSAGE)
        if status == 503:
            headers["Retry-After"] = "1"
        self._respond(start_response, status, reply if method != "HEAD" else b"", rid, headers, len(reply))
        self._log(method, path, status, started, rid, environ, len(reply))
        return [reply] if method != "HEAD" else [b""]

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise _NotAllowed(f"method {method} not allowed here: this route answers {', '.join(allowed)}",
                              ", ".join(allowed))

    def _respond(self, start_response: Any, status: int, body: bytes, rid: str, extra: dict[str, str],
                 length: int | None = None, content_type: str = "application/json") -> None:
        headers = [("Content-Type", content_type), ("X-Request-ID", rid), *extra.items(),
                   ("Content-Length", str(len(body) if length is None else length))]
        start_response(_STATUS_LINES.get(status) or f"{status} Error", headers)

    @staticmethod
    def _log(method: str, path: str, status: int, started: float, rid: str, environ: dict[str, Any], size: int) -> None:
        from ..ops.access_log import log_request

        log_request(method, path, status, time.perf_counter() - started, rid, environ, size)

    # ------------------------------------------------------------------ GET routes

    def _ready(self) -> tuple[bool, str]:
        state = self.app.state
        return state.readiness() if state is not None else (True, "")

    def _get(self, parts: list[str]) -> tuple[int, bytes]:
        registry = self.inference.registry
        if not parts:
            return 200, orjson.dumps({"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS})
        if parts == ["health", "live"]:
            return 200, orjson.dumps({"live": True})
        if parts == ["health", "ready"]:
            ready, reason = self._ready()
            if ready:
                return 200, orjson.dumps({"ready": True})
            return 503, orjson.dumps({"ready": False, "error": reason or "the server is not ready"})
        if parts[:1] == ["models"] and len(parts) >= 2:
            model, version, rest = _model_path(parts[1:])
            if rest == []:
                return 200, orjson.dumps(self._loading_aware(lambda: v2_models.metadata(registry, model, version)))
            if rest == ["ready"]:
                self._loading_aware(lambda: v2_models.lookup(registry, model, version))
                return 200, orjson.dumps({"name": model, "ready": True})
        raise _RouteNotFound()

    def _loading_aware(self, call: Callable[[], Any]) -> Any:
        """``call()``; an unknown model while servables still load is a 503, not a 404."""
        try:
            return call()
        except ServingError as exc:
            if exc.status == 404 and self.inference.dataplane.loading():
                raise _Loading(LOADING_MESSAGE) from None
            raise

    def _index(self) -> tuple[int, bytes]:
        """Triton's repository index: every model name and version served, READY."""
        rows = [{"name": name, "version": str(version), "state": "READY"}
                for name, servable in v2_models.models(self.inference.registry)
                for version in sorted(servable.versions)]
        return 200, orjson.dumps(rows)

    # ------------------------------------------------------------------ infer

    def _infer(self, environ: dict[str, Any], start_response: Any, path: str, where: list[str], rid: str,
               started: float) -> Any:
        app = self.app
        handler = app.handler
        inline = environ.get("mserve.inline", False)
        clock = app.clock.sample() if app.inline is not None else (0.0, 0.0)
        extra: dict[str, str] = {}
        content_type = "application/json"
        label = path
        batched = False
        size = 0
        if environ.get("mserve.shed"):
            status, reply = 503, v2_rest.error_body(handler.shed_reason())
        else:
            try:
                model, version, rest = _model_path(where + ["infer"])
                if rest != ["infer"]:
                    raise _RouteNotFound()
                encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").lower()
                if encoding != "identity":
                    raise _Unsupported(f"Content-Encoding {encoding} is not supported: send the request uncompressed")
                body = self.read_body(environ, app.max_body_bytes)
                size = len(body)
                request = v2_rest.parse_infer(body, environ.get(v2_rest.HEADER_LENGTH_ENVIRON))
                label = self._label(model, version)
                status, reply, extra, batched = self._run(model, version, request, rid, path, environ)
            except ServingError as exc:  # PayloadTooLarge, BadRequest, an unknown route
                status, reply = exc.status, v2_rest.error_body(exc.message)
            except Exception:  # noqa: BLE001 - the client gets a reply, the log the traceback
                log.warning("infer %s: the request could not be read", path, exc_info=True)
                status, reply = 400, v2_rest.error_body("the request body could not be read")
        if status == 503:
            extra["Retry-After"] = "1"
        if v2_rest.HEADER_LENGTH in extra:
            content_type = "application/octet-stream"
        self._respond(start_response, status, reply, rid, extra, content_type=content_type)
        elapsed = time.perf_counter() - started
        if app.inline is not None and status == 200 and not batched:  # as MserveApp's predicts
            on_cpu, queued = app.clock.sample()
            cpu = on_cpu - clock[0]
            app.inline.observe(path, cpu, elapsed if inline else None, elapsed - cpu - (queued - clock[1]))
        app.metrics.observe(label, status, elapsed, inline)
        self._log("POST", path, status, started, rid, environ, len(reply))
        if size >= RELEASE_AFTER_BYTES:  # as MserveApp's predicts: hand a big body's memory back
            release_memory(collect=status >= 400)
        return [reply]

    def _label(self, model: str, version: str | None) -> str:
        """The MindSpore path of the same method, which the request metrics label by."""
        try:
            target = self.inference.target(model, version)
        except ServingError:
            return "/v2/unknown"
        shown = f"/version/{target.version}" if target.version else ""
        return f"/model/{target.servable}{shown}:{target.method}"

    def _run(self, model: str, version: str | None, request: v2_rest.InferRequest, rid: str, path: str,
             environ: dict[str, Any]) -> tuple[int, bytes, dict[str, str], bool]:
        app = self.app
        watch = self._arm_deadline(environ, rid)
        epoch = app.epochs.enter()
        try:
            outcome = self.inference.infer(model, version, request.inputs, where=path)
        finally:
            app.epochs.leave(epoch)
            if watch is not None:
                app.deadlines.disarm(watch)
        if outcome.error is not None:
            return outcome.status, v2_rest.error_body(outcome.error), {}, False
        inferred = outcome.reply
        try:
            chosen = v2_rest.select_outputs(request.outputs, request.binary_output, inferred.outputs)
            body, json_length = v2_rest.encode_infer(model, inferred.version, request.id, inferred.outputs, chosen)
        except BadRequest as exc:
            return exc.status, v2_rest.error_body(exc.message), {}, inferred.batched
        except OutputError as exc:
            return 500, v2_rest.error_body(str(exc)), {}, inferred.batched
        extra = {v2_rest.HEADER_LENGTH: str(json_length)} if json_length is not None else {}
        return 200, body, extra, inferred.batched

    def _arm_deadline(self, environ: dict[str, Any], rid: str) -> int | None:
        """Have a 504 sent at the deadline if the infer is still running then."""
        reply_early = environ.get("mserve.reply_early")
        if reply_early is None:
            return None
        timeout = self.app.handler.request_timeout

        def fire() -> None:
            body = v2_rest.error_body("Time out")
            headers = [("Content-Type", "application/json"), ("X-Request-ID", rid)]
            if reply_early(_STATUS_LINES[504], headers, body):
                log.warning("infer %s still running at its deadline (%gs): answered 504", rid, timeout)

        return self.app.deadlines.arm(time.monotonic() + timeout, fire)


def _model_path(parts: list[str]) -> tuple[str, str | None, list[str]]:
    """``{model}[/versions/{v}][/rest...]`` -> (model, version or None, rest)."""
    model, rest = parts[0], parts[1:]
    version = None
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            raise _RouteNotFound()
        version, rest = rest[1], rest[2:]
    if not model:
        raise _RouteNotFound()
    return model, version, rest


class _NotAllowed(Exception):
    def __init__(self, message: str, allow: str):
        super().__init__(message)
        self.message = message
        self.allow = allow


class _RouteNotFound(ServingError):
    status = 404

    def __init__(self) -> None:
        super().__init__(
            "no such route: the Open Inference Protocol's routes are /v2, /v2/health/live, /v2/health/ready, "
            "/v2/models/{model}[/versions/{version}][/ready|/infer] and /v2/repository/index"
        )


class _Loading(ServingError):
    status = 503


class _Unsupported(ServingError):
    status = 415
