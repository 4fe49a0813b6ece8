"""The OpenAPI 3 document served at ``GET /openapi.json``.

It describes every endpoint: the predict URLs in their general form
(``/model/{servable}[/version/{version}]:{method}``) with the request and reply
schemas of PROTOCOL.md, one concrete path per loaded method
(``/model/add:add_common``) whose schema names that method's inputs and outputs
(with dtype and shape where the model declares them), and the GET endpoints. The
document follows what is loaded, so it is built per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..protocol.codec import B64_TYPES
from . import openapi_v2
from .examples import request_example
from .metadata import describe_method

REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _error_response(description: str, retry: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref("Error")}},
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
    }
    if retry:
        response["headers"]["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds to wait"}
    return response


def _ok(description: str, schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {
        "description": description,
        "content": {media: {"schema": schema}},
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}},
    }


_REQUEST_ID_PARAM = {"$ref": "#/components/parameters/X-Request-ID"}


def _components() -> dict[str, Any]:
    tensor_spec = {
        "type": "object",
        "properties": {
            "dtype": {"type": "string", "nullable": True, "description": "numpy dtype name; null when unknown"},
            "shape": {
                "type": "array",
                "nullable": True,
                "items": {"type": "integer", "nullable": True},
                "description": "per instance, without the batch dimension; null entries are free dimensions",
            },
        },
    }
    named_spec = {"allOf": [tensor_spec, {"type": "object", "properties": {"name": {"type": "string"}}}]}
    method = {
        "type": "object",
        "required": ["name", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("NamedTensorSpec")},
            "outputs": {"type": "array", "items": _ref("NamedTensorSpec")},
        },
    }
    model = {
        "type": "object",
        "properties": {
            "files": {"type": "array", "items": {"type": "string"}},
            "format": {"type": "string"},
            "with_batch_dim": {"type": "boolean"},
            "max_batch_size": {"type": "integer", "nullable": True},
            "devices": {"type": "integer"},
            "inputs": {"type": "array", "items": {"type": "string"}},
            "outputs": {"type": "array", "items": {"type": "string"}},
            "batching": {
                "type": "object",
                "properties": {
                    "cross_request": {"type": "boolean"},
                    "batch_sizes": {"type": "array", "items": {"type": "integer"}},
                    "max_batch_delay_ms": {"type": "number", "nullable": True},
                },
            },
        },
    }
    version = {
        "type": "object",
        "required": ["version", "methods", "models"],
        "properties": {
            "version": {"type": "integer"},
            "methods": {"type": "array", "items": _ref("Method")},
            "models": {"type": "array", "items": _ref("Model")},
        },
    }
    servable = {
        "type": "object",
        "required": ["name", "latest_version", "versions"],
        "properties": {
            "name": {"type": "string"},
            "latest_version": {"type": "integer"},
            "versions": {"type": "array", "items": _ref("Version")},
            "failed_versions": {
                "type": "array",
                "description": "Version folders hot reload could not load (skipped until their files change)",
                "items": {
                    "type": "object",
                    "properties": {"version": {"type": "integer"}, "error": {"type": "string"}},
                },
            },
        },
    }
    b64 = {
        "type": "object",
        "required": ["b64"],
        "properties": {
            "b64": {"type": "string", "format": "byte", "description": "base64 of the raw little-endian bytes"},
            "type": {"type": "string", "enum": sorted(B64_TYPES), "default": "bytes"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        },
    }
    value = {
        "description": "A value: a scalar (int -> int32, float -> float32, bool, str), nested arrays of one "
        "scalar kind (a tensor), or a base64 object (PROTOCOL.md section 2)",
        "anyOf": [
            {"type": "number"},
            {"type": "boolean"},
            {"type": "string"},
            {"type": "array", "items": {}, "description": "nested arrays, all leaves of one kind"},
            _ref("B64"),
        ],
    }
    output_value = {
        "description": "An output value: a scalar, nested arrays (a tensor; NaN and infinities are null), or "
        "{\"b64\": ...} for bytes",
        "anyOf": [
            {"type": "number", "nullable": True},
            {"type": "boolean"},
            {"type": "string"},
            {"type": "array", "items": {}, "description": "nested arrays"},
            _ref("B64"),
        ],
    }
    return {
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error_msg"],
                "properties": {"error_msg": {"type": "string"}},
            },
            "Value": value,
            "OutputValue": output_value,
            "B64": b64,
            "PredictRequest": {
                "type": "object",
                "required": ["instances"],
                "properties": {
                    "instances": {
                        "description": "Instances, each mapping every input name of the method to a value "
                        "(one object is taken as one instance)",
                        "oneOf": [
                            {"type": "array", "minItems": 1, "items": {"type": "object", "additionalProperties": _ref("Value")}},
                            {"type": "object", "additionalProperties": _ref("Value")},
                        ],
                    }
                },
            },
            "PredictReply": {
                "description": "Per instance its outputs, or its error_msg; or one error_msg for the request",
                "type": "object",
                "properties": {
                    "instances": {
                        "type": "array",
                        "items": {"type": "object", "additionalProperties": _ref("OutputValue")},
                    },
                    "error_msg": {"type": "string"},
                },
            },
            "TensorSpec": tensor_spec,
            "NamedTensorSpec": named_spec,
            "Method": method,
            "Model": model,
            "Version": version,
            "Servable": servable,
            "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
            "Readiness": {
                "type": "object",
                "required": ["ready", "status", "servables"],
                "properties": {
                    "ready": {"type": "boolean"},
                    "status": {"type": "string", "description": "ready, or why not"},
                    "servables": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "properties": {
                                "versions": {"type": "array", "items": {"type": "integer"}},
                                "latest_version": {"type": "integer"},
                            },
                        },
                    },
                },
            },
        },
        "parameters": {
            "X-Request-ID": {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "Request id for the access log, echoed in the reply (1-128 characters of "
                "A-Z a-z 0-9 . _ : / + = @ -; anything else is replaced by a new id)",
                "schema": {"type": "string"},
            }
        },
        "headers": {
            "X-Request-ID": {"description": "The request's id (the client's, or a new one)", "schema": {"type": "string"}}
        },
    }


def _predict_responses(reply: dict[str, Any]) -> dict[str, Any]:
    """200 when some instance succeeded; otherwise the failure's status, with one
    error_msg or (instances failing for different causes) one per instance."""

    def failed(description: str, retry: bool = False) -> dict[str, Any]:
        response = _ok(description, reply)
        if retry:
            response["headers"]["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds to wait"}
        return response

    return {
        "200": _ok("Every instance answered (some may carry error_msg)", reply),
        "400": failed("Bad URL, JSON or value"),
        "404": failed("Unknown servable, version or method"),
        "413": _error_response("Body over the server's limit"),
        "500": failed("A model or stage failed (the message says which)"),
        "503": failed("Queue full, shutting down, or still loading", retry=True),
        "504": failed("Request timed out"),
    }


def _tensor_schema(dtype: str | None, shape: list[int | None] | None, output: bool = False) -> dict[str, Any]:
    """The JSON schema of one input/output value, as exact as the model says."""
    kinds = {"float16": "number", "float32": "number", "float64": "number", "bool": "boolean"}
    leaf_type = kinds.get(dtype or "") or ("integer" if (dtype or "").startswith(("int", "uint")) else None)
    if leaf_type is None or shape is None:
        return _ref("OutputValue" if output else "Value")
    schema: dict[str, Any] = {"type": leaf_type}
    if leaf_type == "number" and output:
        schema["nullable"] = True  # NaN and infinities are written as null
    for dim in reversed(shape):
        level: dict[str, Any] = {"type": "array", "items": schema}
        if dim is not None:
            level["minItems"] = level["maxItems"] = dim
        schema = level
    if not shape:
        return {"anyOf": [schema, _ref("B64")], "description": f"{dtype} scalar"}
    shown = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    return {"anyOf": [schema, _ref("B64")], "description": f"{dtype}{shown}"}


def _method_operation(name: str, described: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    method = described["name"]
    inputs = {i["name"]: _tensor_schema(i["dtype"], i["shape"]) for i in described["inputs"]}
    outputs = {o["name"]: _tensor_schema(o["dtype"], o["shape"], output=True) for o in described["outputs"]}
    instance = {"type": "object", "required": list(inputs), "properties": inputs}
    request = {
        "type": "object",
        "required": ["instances"],
        "properties": {"instances": {"type": "array", "minItems": 1, "items": instance}},
    }
    reply_instance = {
        "anyOf": [
            {"type": "object", "required": list(outputs), "properties": outputs},
            _ref("Error"),
        ]
    }
    reply = {
        "type": "object",
        "properties": {"instances": {"type": "array", "items": reply_instance}, "error_msg": {"type": "string"}},
    }
    return {
        "post": {
            "operationId": f"predict_{name}_{method}",
            "summary": f"{name}.{method}: inputs {', '.join(inputs) or '-'}; outputs {', '.join(outputs) or '-'}",
            "tags": ["predict"],
            "parameters": [_REQUEST_ID_PARAM],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": request, "example": request_example(folder, method, described["inputs"]),
            }}},
            "responses": _predict_responses(reply),
        }
    }


def _get(operation_id: str, summary: str, responses: dict[str, Any], parameters: list | None = None) -> dict:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["operations"],
            "parameters": [_REQUEST_ID_PARAM, *(parameters or [])],
            "responses": responses,
        }
    }


def document(servables: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document for the servables loaded now."""
    name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version_param = {
        "name": "version", "in": "path", "required": True,
        "description": "a version number; 0 is the latest", "schema": {"type": "integer", "minimum": 0},
    }
    predict_params = [
        {"name": "servable", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "method", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    generic_predict = {
        "tags": ["predict"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PredictRequest")}}},
        "responses": _predict_responses(_ref("PredictReply")),
    }
    index_schema = {
        "type": "object",
        "required": ["name", "methods", "links"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "methods": {"type": "array", "items": {"type": "object", "properties": {
                "servable": {"type": "string"}, "method": {"type": "string"}, "url": {"type": "string"},
                "version": {"type": "integer"}, "versions": {"type": "array", "items": {"type": "integer"}},
                "inputs": {"type": "array", "items": _ref("NamedTensorSpec")},
                "outputs": {"type": "array", "items": _ref("NamedTensorSpec")},
            }}},
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    index_ok = _ok("The served methods and links (HTML when the client prefers text/html)", index_schema)
    index_ok["content"]["text/html"] = {"schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/": _get("index", "The served methods (predict URLs, inputs, outputs) and links to the endpoints",
                  {"200": index_ok}),
        "/docs": _get("docs", "This document as an interactive page (Swagger UI)",
                      {"200": _ok("HTML page", {"type": "string"}, "text/html")}),
        "/health": _get("health", "200 while the process serves", {"200": _ok("Alive", _ref("Health"))}),
        "/ready": _get(
            "ready",
            "200 when every configured servable is loaded and warm; 503 while loading and from the start of shutdown",
            {"200": _ok("Ready", _ref("Readiness")), "503": _ok("Not ready", _ref("Readiness"))},
        ),
        "/models": _get(
            "models", "Every loaded servable",
            {"200": _ok("Servables", {
                "type": "object", "required": ["servables"],
                "properties": {"servables": {"type": "array", "items": _ref("Servable")}},
            })},
        ),
        "/model/{name}": _get(
            "model", "A servable: its versions (and the latest), methods, models and batching",
            {"200": _ok("The servable", _ref("Servable")), "404": _error_response("No such servable"),
             "405": _error_response("A predict URL (name:method) asked with GET")},
            [name_param],
        ),
        "/model/{name}/version/{version}": _get(
            "model_version", "One loaded version of a servable",
            {
                "200": _ok("The version", {"allOf": [_ref("Version"), {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "latest": {"type": "boolean"}},
                }]}),
                "400": _error_response("The version is not a number"),
                "404": _error_response("No such servable or version"),
                "405": _error_response("A predict URL (version:method) asked with GET"),
            },
            [name_param, version_param],
        ),
        "/metrics": _get(
            "metrics", "Prometheus metrics (text exposition format; OpenMetrics when asked for)",
            {"200": _ok("Metrics", {"type": "string"}, "text/plain")},
        ),
        "/openapi.json": _get(
            "openapi", "This document", {"200": _ok("OpenAPI 3 document", {"type": "object"})}
        ),
        "/model/{servable}:{method}": {
            "post": {
                "operationId": "predict",
                "summary": "Run a method of the latest version of a servable",
                "parameters": [_REQUEST_ID_PARAM, *predict_params],
                **generic_predict,
            }
        },
        "/model/{servable}/version/{version}:{method}": {
            "post": {
                "operationId": "predict_version",
                "summary": "Run a method of one version of a servable",
                "parameters": [_REQUEST_ID_PARAM, predict_params[0], version_param, predict_params[1]],
                **generic_predict,
            }
        },
    }
    for name in sorted(servables):
        servable = servables[name]
        latest = servable.versions[servable.latest]
        for method in latest.methods.values():
            paths[f"/model/{name}:{method.name}"] = _method_operation(
                name, describe_method(latest, method), Path(servable.directory) / name
            )
    paths.update(openapi_v2.paths())  # the Open Inference Protocol (KServe v2)
    components = _components()
    components["schemas"].update(openapi_v2.schemas())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "mserve",
            "version": mserve_version(),
            "description": "MindSpore Serving's RESTful protocol and the Open Inference Protocol (KServe v2) "
            "served by mserve, plus health, readiness, metadata and metrics endpoints. Every reply carries "
            "X-Request-ID.",
        },
        "paths": paths,
        "components": components,
    }


def mserve_version() -> str:
    try:
        from importlib.metadata import version

        return version("mserve")
    except Exception:
        return "0"
