"""The Open Inference Protocol's REST bodies: infer requests in, infer replies out.

An infer request is JSON (``id``, ``parameters``, ``inputs`` with ``name``,
``shape``, ``datatype``, ``data``, ``parameters``; ``outputs`` naming the outputs
wanted). With the binary tensor data extension (what tritonclient sends by default)
the body is the JSON followed by raw tensor bytes: the ``Inference-Header-Content-Length``
header gives the JSON's length, and each input whose data is binary says its size in
``parameters.binary_data_size`` (the bytes follow in input order).

Replies carry an output as JSON ``data`` unless the client asked for it in binary
(``outputs[i].parameters.binary_data``, or ``parameters.binary_data_output`` for all):
then the JSON says ``binary_data_size`` and the bytes follow, again with the header.
Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ..errors import BadRequest
from . import v2_tensors

HEADER_LENGTH = "Inference-Header-Content-Length"
HEADER_LENGTH_ENVIRON = "HTTP_INFERENCE_HEADER_CONTENT_LENGTH"
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared-memory tensors are not supported by mserve; send the data in the request",
    "classification": "the classification extension is not supported by mserve; ask for the output itself",
}


@dataclass
class InferRequest:
    """A parsed infer request: its tensors by name, and how the reply should look."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] | None  # requested (name, binary); None: all outputs
    binary_output: bool = False  # the default for outputs not asked for one by one
    parameters: dict[str, Any] = field(default_factory=dict)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _check_parameters(parameters: dict[str, Any], where: str) -> None:
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise BadRequest(f"{where}: {key}: {why}")


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """The infer request in ``body``; `BadRequest` naming what is wrong and where."""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be a number, got {header_length!r}") from None
        if not 0 <= json_length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {json_length} is not within the body's {len(body)} bytes")
    else:
        json_length = len(body)
    try:
        request = orjson.loads(memoryview(body)[:json_length])
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the infer request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest(f"the infer request must be a JSON object, got {type(request).__name__}")
    parameters = _object(request.get("parameters"), "parameters")
    _check_parameters(parameters, "parameters")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the infer request needs \"inputs\": a non-empty list of tensors")
    binary = memoryview(body)[json_length:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for position, tensor in enumerate(raw_inputs):
        if not isinstance(tensor, dict):
            raise BadRequest(f"inputs[{position}] must be a JSON object")
        name, datatype, shape = v2_tensors.check_header(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"))
        if name in inputs:
            raise BadRequest(f"input {name} is given twice")
        tensor_parameters = _object(tensor.get("parameters"), f"input {name} parameters")
        _check_parameters(tensor_parameters, f"input {name}")
        as_str = tensor_parameters.get("content_type") == "str"
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input {name}: binary_data_size must be a non-negative integer, got {size!r}")
            if "data" in tensor:
                raise BadRequest(f"input {name} has both data and binary_data_size: send one")
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name}: binary_data_size {size} runs past the binary data "
                    f"({len(binary) - offset} bytes left; is {HEADER_LENGTH} set?)"
                )
            inputs[name] = v2_tensors.from_raw(name, datatype, shape, binary[offset:offset + size], as_str)
            offset += size
        elif "data" in tensor:
            as_str = tensor_parameters.get("content_type", "str") == "str"
            inputs[name] = v2_tensors.from_json(name, datatype, shape, tensor["data"], as_str)
        else:
            raise BadRequest(f"input {name} has no data: give \"data\" or parameters.binary_data_size")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the JSON belong to no input")
    return InferRequest(
        id=_id(request.get("id")),
        inputs=inputs,
        outputs=_requested(request.get("outputs")),
        binary_output=parameters.get("binary_data_output") is True,
        parameters=parameters,
    )


def _id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"id must be a string, got {type(value).__name__}")
    return value


def _requested(value: Any) -> list[tuple[str, bool]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest("outputs must be a list of {\"name\": ...} objects")
    requested = []
    for position, output in enumerate(value):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{position}] must be an object with a \"name\"")
        parameters = _object(output.get("parameters"), f"output {output['name']} parameters")
        _check_parameters(parameters, f"output {output['name']}")
        requested.append((output["name"], parameters.get("binary_data") is True))
    return requested


def select_outputs(
    request_outputs: list[tuple[str, bool]] | None, binary_default: bool, outputs: dict[str, np.ndarray]
) -> list[tuple[str, bool]]:
    """The outputs to send, in order, each with whether it goes binary."""
    if request_outputs is None:
        return [(name, binary_default) for name in outputs]
    unknown = [name for name, _ in request_outputs if name not in outputs]
    if unknown:
        raise BadRequest(f"unknown output(s) {', '.join(unknown)} requested: the model has {', '.join(outputs)}")
    return request_outputs


def encode_infer(
    model: str, version: int, request_id: str | None, outputs: dict[str, np.ndarray], chosen: list[tuple[str, bool]]
) -> tuple[bytes, int | None]:
    """The reply body, and the JSON's length when binary data follows (else None)."""
    tensors = []
    blobs = []
    for name, binary in chosen:
        array = outputs[name]
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": v2_tensors.datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            raw = v2_tensors.to_raw(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = v2_tensors.to_json(name, array)
        tensors.append(tensor)
    reply: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if request_id is not None:
        reply["id"] = request_id
    head = orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
