"""The GET endpoints: health, readiness, servable metadata, metrics, OpenAPI.

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
from ..serving.servable import LoadedVersion, Servable


GET_PATHS = frozenset({"/health", "/ready", "/models", "/metrics", "/openapi.json"})
_MODEL_PATH = re.compile(r"/model/[^/:]+(/version/[^/:]+)?")


def is_get_path(path: str) -> bool:
    """A URL of a GET endpoint (not a predict URL, which has ``:method``)."""
    return path in GET_PATHS or _MODEL_PATH.fullmatch(path) is not None


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), status=status, mimetype="application/json", headers=headers)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error_msg": message})


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


def create_blueprint(state: Any) -> Blueprint:
    """The endpoints over ``state`` (`mserve.server._State`: registry, readiness)."""
    bp = Blueprint("mserve_ops", __name__)
    registry = state.registry

    def get(rule: str) -> Any:
        # No automatic OPTIONS: other methods, OPTIONS too, get the app's 405.
        return bp.get(rule, provide_automatic_options=False)

    @get("/health")
    def health() -> Response:
        return _json(200, {"status": "ok"})

    @get("/ready")
    def ready() -> Response:
        ok, reason = state.readiness()
        metrics.READY.set(1 if ok else 0)
        servables = registry.servables()
        body = {
            "ready": ok,
            "status": reason,
            "servables": {
                name: {"versions": sorted(s.versions), "latest_version": s.latest}
                for name, s in sorted(servables.items())
            },
        }
        return _json(200, body) if ok else _json(503, body, {"Retry-After": "1"})

    @get("/models")
    def models() -> Response:
        servables = registry.servables()
        return _json(200, {"servables": [describe(servables[n], state) for n in sorted(servables)]})

    @get("/model/<name>")
    def model(name: str) -> Response:
        if ":" in name:  # a predict URL
            from ..transport.wsgi import method_not_allowed

            return method_not_allowed()
        servable = registry.servables().get(name)
        if servable is None:
            return _error(404, f"servable {name} is not available")
        return _json(200, describe(servable, state))

    @get("/model/<name>/version/<version>")
    def model_version(name: str, version: str) -> Response:
        if ":" in version:  # a predict URL
            from ..transport.wsgi import method_not_allowed

            return method_not_allowed()
        if not (version.isascii() and version.isdigit()):
            return _error(400, f"please check url, the keyword:[version] value invalid, request version number {version}")
        servable = registry.servables().get(name)
        if servable is None:
            return _error(404, f"servable {name} is not available")
        number = int(version) or servable.latest
        loaded = servable.versions.get(number)
        if loaded is None:
            return _error(404, f"servable {name} version {number} is not available")
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
