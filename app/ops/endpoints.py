"""The GET endpoints: an index, health, readiness, servable metadata, metrics, OpenAPI.

    GET /                                an index: the served methods (their predict
                                         URLs and inputs) and links to everything below
                                         (HTML for a browser, JSON otherwise)
    GET /docs                            an interactive page of /openapi.json (Swagger
                                         UI, its assets from the flask-swagger-ui
                                         package: nothing is fetched from the network)
    GET /health                          200 {"status": "ok"} while the process serves
    GET /ready                           200 when every servable is loaded and warm, else 503
    GET /models                          every servable, as GET /model/{name}
    GET /model/{name}                    versions (and the latest), methods with their
                                         inputs/outputs, models with their batching
    GET /model/{name}/version/{n}        one version
    GET /metrics                         Prometheus exposition (mserve.ops.metrics)
    GET /openapi.json                    the OpenAPI 3 document (mserve.ops.openapi)

They never touch the predict contract: a predict URL (``/model/add:add_common``)
asked with GET still answers 405, and every POST goes to the predict handler.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, request

from . import metrics
from ..protocol.codec import dumps
from .metadata import describe_servable, describe_version
from ..serving.servable import LoadedVersion, Servable, clip


GET_PATHS = frozenset({"/", "/docs", "/docs/", "/health", "/ready", "/models", "/metrics", "/openapi.json"})
_MODEL_PATH = re.compile(r"/model/[^/:]+(/version/[^/:]+)?")
_DOCS_ASSET = re.compile(r"/docs/[A-Za-z0-9_.-]+")


def is_get_path(path: str) -> bool:
    """A URL of a GET endpoint (not a predict URL, which has ``:method``)."""
    return path in GET_PATHS or _MODEL_PATH.fullmatch(path) is not None or _DOCS_ASSET.fullmatch(path) is not None


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), status=status, mimetype="application/json", headers=headers)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error_msg": message})


def method_not_allowed() -> Response:
    """A predict URL asked with anything but POST (PROTOCOL.md section 1)."""
    response = _error(405, "http message only support POST right now")
    response.headers["Allow"] = "POST"
    return response


def _with_batching(version: LoadedVersion, described: dict[str, Any]) -> dict[str, Any]:
    """`describe_version` plus each model's batching settings."""
    for model, (index, stage) in zip(described["models"], version.stages.items()):
        batcher = version.batchers.get(index)
        model["batching"] = {
            "cross_request": batcher is not None,
            "batch_sizes": list(stage.buckets),
            "max_batch_delay_ms": round(batcher.max_delay * 1000.0, 6) if batcher is not None else None,
        }
    return described


def describe(servable: Servable, state: Any) -> dict[str, Any]:
    described = describe_servable(servable)
    for version_desc in described["versions"]:
        _with_batching(servable.versions[version_desc["version"]], version_desc)
    described["failed_versions"] = state.failed_versions(servable.name)
    return described


def readiness_response(state: Any) -> Response:
    """``GET /ready``: 200 when ready, else 503 with Retry-After; the body says why."""
    ok, reason = state.readiness()
    metrics.READY.set(1 if ok else 0)
    servables = state.registry.servables()
    body = {
        "ready": ok,
        "status": reason,
        "servables": {
            name: {"versions": sorted(s.versions), "latest_version": s.latest} for name, s in sorted(servables.items())
        },
    }
    return _json(200, body) if ok else _json(503, body, {"Retry-After": "1"})


def create_probe_app(state: Any) -> Any:
    """A WSGI app answering ``GET /health`` and ``GET /ready`` only, for the plain-HTTP
    health port (`mserve.server.start_health_server`); anything else is a JSON 404."""
    import time

    from flask import Flask

    from .access_log import log_request, request_id

    app = Flask("mserve-probes")

    @app.get("/health", provide_automatic_options=False)
    def health() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/ready", provide_automatic_options=False)
    def ready() -> Response:
        return readiness_response(state)

    @app.errorhandler(404)
    @app.errorhandler(405)
    def other(exc: Any) -> Response:
        return _error(404, "this port answers GET /health and GET /ready only")

    def logged(environ: dict[str, Any], start_response: Any) -> Any:
        started = time.perf_counter()
        rid = request_id(environ)
        seen: list[int] = []

        def respond(status: str, headers: list, exc_info: Any = None) -> Any:
            seen.append(int(status.split(" ", 1)[0]))
            headers.append(("X-Request-ID", rid))
            return start_response(status, headers, exc_info)

        result = app(environ, respond)
        log_request(environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/", seen[-1] if seen else 0,
                    time.perf_counter() - started, rid, environ, None)
        return result

    return logged


def _prefers_html(req: Any) -> bool:
    """A browser (``text/html`` ranked above JSON in Accept) gets the HTML index."""
    accept = req.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


def create_blueprint(state: Any) -> Blueprint:
    """The endpoints over ``state`` (`mserve.runtime.runtime.Runtime`: registry, readiness)."""
    bp = Blueprint("mserve_ops", __name__)
    registry = state.registry

    def get(rule: str) -> Any:
        # No automatic OPTIONS: other methods, OPTIONS too, get the app's 405.
        return bp.get(rule, provide_automatic_options=False)

    @get("/")
    def index() -> Response:
        from .index import index_html, index_json

        listing = index_json(registry.servables())
        if _prefers_html(request):
            return Response(index_html(listing), status=200, mimetype="text/html")
        return _json(200, listing)

    @get("/docs")
    def docs() -> Response:
        from .index import docs_html

        return Response(docs_html(), status=200, mimetype="text/html")

    @get("/docs/")
    def docs_slash() -> Response:
        return Response(status=308, headers={"Location": "/docs"})

    @get("/docs/<asset>")
    def docs_asset(asset: str) -> Response:
        from .index import docs_asset as read_asset

        found = read_asset(asset)
        if found is None:
            return _error(404, f"no such file: /docs/{clip(asset)}")
        data, mimetype = found
        return Response(data, status=200, mimetype=mimetype, headers={"Cache-Control": "public, max-age=86400"})

    @get("/health")
    def health() -> Response:
        return _json(200, {"status": "ok"})

    @get("/ready")
    def ready() -> Response:
        return readiness_response(state)

    @get("/models")
    def models() -> Response:
        servables = registry.servables()
        return _json(200, {"servables": [describe(servables[n], state) for n in sorted(servables)]})

    @get("/model/<name>")
    def model(name: str) -> Response:
        if ":" in name:  # a predict URL
            return method_not_allowed()
        servable = registry.servables().get(name)
        if servable is None:
            return _error(404, f"servable {clip(name)} is not available{registry.servable_hint(name)}")
        return _json(200, describe(servable, state))

    @get("/model/<name>/version/<version>")
    def model_version(name: str, version: str) -> Response:
        if ":" in version:  # a predict URL
            return method_not_allowed()
        if not (version.isascii() and version.isdigit()):
            return _error(
                400, f"please check url, the keyword:[version] value invalid, request version number {clip(version)}"
            )
        servable = registry.servables().get(name)
        if servable is None:
            return _error(404, f"servable {clip(name)} is not available{registry.servable_hint(name)}")
        number = int(version) or servable.latest
        loaded = servable.versions.get(number)
        if loaded is None:
            served = ", ".join(map(str, sorted(servable.versions)))
            return _error(404, f"servable {name} version {clip(str(number))} is not available; served: {served}")
        described = _with_batching(loaded, describe_version(loaded))
        return _json(200, {"name": name, "latest": number == servable.latest, **described})

    @get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render(request.headers.get("Accept"))
        return Response(body, status=200, content_type=content_type)

    @get("/openapi.json")
    def openapi() -> Response:
        from .openapi import document

        return _json(200, document(registry.servables()))

    return bp
