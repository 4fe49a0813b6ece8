"""The Open Inference Protocol's routes in the OpenAPI document (``/openapi.json``, ``/docs``).

`mserve.ops.openapi.document` adds `paths` and `schemas` to MindSpore's routes; the
routes themselves are `mserve.transport.v2_routes`'s.
"""

from __future__ import annotations

from typing import Any

from ..protocol.v2_tensors import DATATYPES

REF = "#/components/schemas/"
_HEADERS = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
_REQUEST_ID = {"$ref": "#/components/parameters/X-Request-ID"}
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
          "description": "{servable}.{method}, or the servable's name when it has one method"}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "a version number, as a string"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _json(description: str, schema: str, retry: bool = False) -> dict[str, Any]:
    headers = dict(_HEADERS)
    if retry:
        headers["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds to wait"}
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}},
            "headers": headers}


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    return _json(description, "V2Error", retry)


def _get(operation_id: str, summary: str, responses: dict[str, Any], parameters: list | None = None) -> dict:
    return {"get": {"operationId": operation_id, "summary": summary, "tags": ["open inference protocol (v2)"],
                    "parameters": [_REQUEST_ID, *(parameters or [])], "responses": responses}}


def _infer(operation_id: str, parameters: list) -> dict:
    ok = _json("The outputs (with binary outputs: the JSON, then their bytes)", "V2InferResponse")
    ok["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    ok["headers"] = {**ok["headers"], "Inference-Header-Content-Length": {
        "schema": {"type": "integer"}, "description": "With binary outputs: the length of the JSON part"}}
    return {"post": {
        "operationId": operation_id,
        "summary": "Run a model: one tensor per input (JSON data, or binary after the JSON)",
        "tags": ["open inference protocol (v2)"],
        "parameters": [_REQUEST_ID, *parameters, {
            "name": "Inference-Header-Content-Length", "in": "header", "required": False,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Binary tensor data extension: the length of the JSON part of the body"}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("V2InferRequest")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {
            "200": ok,
            "400": _error("Bad request: the message names what is wrong"),
            "404": _error("No such model or version"),
            "405": _error("Not POST"),
            "413": _error("Body or instances over the limits"),
            "415": _error("A Content-Encoding other than identity"),
            "500": _error("A stage failed inside the server, or an output cannot be sent"),
            "503": _error("Over capacity, loading, or shutting down", retry=True),
            "504": _error("The request timeout passed"),
        },
    }}


def paths() -> dict[str, Any]:
    """The ``/v2`` routes."""
    metadata = {"200": _json("Model metadata", "V2ModelMetadata"), "404": _error("No such model or version"),
                "503": _error("Servables are still loading", retry=True)}
    ready = {"200": _json("Ready", "V2ModelReady"), "404": _error("No such model or version"),
             "503": _error("Servables are still loading", retry=True)}
    index = {"post": {
        "operationId": "v2_repository_index", "summary": "Every model and version served (Triton's extension)",
        "tags": ["open inference protocol (v2)"], "parameters": [_REQUEST_ID],
        "responses": {"200": {"description": "The models", "headers": _HEADERS, "content": {"application/json": {
            "schema": {"type": "array", "items": _ref("V2IndexEntry")}}}}},
    }}
    return {
        "/v2": _get("v2_server_metadata", "Server metadata", {"200": _json("Server metadata", "V2ServerMetadata")}),
        "/v2/health/live": _get("v2_live", "200 while the process serves", {"200": _json("Live", "V2Live")}),
        "/v2/health/ready": _get("v2_ready", "200 when every servable is loaded and warm", {
            "200": _json("Ready", "V2Ready"), "503": _json("Not ready", "V2Ready", retry=True)}),
        "/v2/models/{model}": _get("v2_model_metadata", "A model's versions, inputs and outputs", metadata,
                                   [_MODEL]),
        "/v2/models/{model}/versions/{version}": _get("v2_model_version_metadata", "One version's metadata",
                                                      metadata, [_MODEL, _VERSION]),
        "/v2/models/{model}/ready": _get("v2_model_ready", "200 when the model is served", ready, [_MODEL]),
        "/v2/models/{model}/versions/{version}/ready": _get("v2_model_version_ready", "200 when that version is"
                                                            " served", ready, [_MODEL, _VERSION]),
        "/v2/models/{model}/infer": _infer("v2_infer", [_MODEL]),
        "/v2/models/{model}/versions/{version}/infer": _infer("v2_infer_version", [_MODEL, _VERSION]),
        "/v2/repository/index": index,
    }


def schemas() -> dict[str, Any]:
    """The schemas `paths` refers to."""
    parameters = {"type": "object", "additionalProperties": True}
    shape = {"type": "array", "items": {"type": "integer"}}
    datatype = {"type": "string", "enum": list(DATATYPES)}
    return {
        "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "V2Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "V2Ready": {"type": "object", "required": ["ready"],
                    "properties": {"ready": {"type": "boolean"}, "error": {"type": "string"}}},
        "V2ModelReady": {"type": "object", "required": ["name", "ready"],
                         "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
        "V2ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "V2TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "shape": shape,
            "datatype": {"type": "string", "description": "UNKNOWN when a Python stage takes the input first"}}},
        "V2ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                            "properties": {
                                "name": {"type": "string"}, "platform": {"type": "string"},
                                "versions": {"type": "array", "items": {"type": "string"}},
                                "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
                                "outputs": {"type": "array", "items": _ref("V2TensorMetadata")}}},
        "V2RequestTensor": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": shape, "datatype": datatype, "parameters": parameters,
            "data": {"type": "array", "items": {}, "description": "row-major, flat or nested"}}},
        "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": parameters,
            "inputs": {"type": "array", "minItems": 1, "items": _ref("V2RequestTensor")},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "parameters": parameters}}}}},
        "V2ResponseTensor": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": shape, "datatype": datatype, "parameters": parameters,
            "data": {"type": "array", "items": {}}}},
        "V2InferResponse": {"type": "object", "required": ["model_name", "model_version", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("V2ResponseTensor")}}},
        "V2IndexEntry": {"type": "object", "required": ["name", "version", "state"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"}}},
    }
