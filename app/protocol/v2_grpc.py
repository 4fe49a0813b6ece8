"""The Open Inference Protocol's gRPC messages (``ModelInferRequest``/``Response``) <-> numpy.

Inputs come as ``raw_input_contents`` (little-endian, one entry per input in order:
what tritonclient sends) or as an input's typed ``contents``; the kserve SDK mixes
both in one request, so each input without contents takes the next raw entry.
Replies always carry ``raw_output_contents``, one entry per output, as Triton does;
every OIP client reads them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadRequest
from . import v2_tensors

# The typed contents field of each datatype (FP16 has none: it travels raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_UNSUPPORTED = {
    "shared_memory_region": "shared-memory tensors are not supported by mserve; send the data in the request",
    "classification": "the classification extension is not supported by mserve; ask for the output itself",
}


def _check_parameters(parameters: Any, where: str) -> None:
    for key, why in _UNSUPPORTED.items():
        if key in parameters:
            raise BadRequest(f"{where}: {key}: {why}")


def _as_str(parameters: Any) -> bool:
    choice = parameters.get("content_type")
    return choice is not None and choice.string_param == "str"


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    """The request's input tensors by name; `BadRequest` naming what is wrong."""
    _check_parameters(request.parameters, "parameters")
    if not request.inputs:
        raise BadRequest("the infer request has no inputs")
    raw = request.raw_input_contents
    typed = sum(1 for tensor in request.inputs if tensor.HasField("contents"))
    if len(raw) != len(request.inputs) - typed:
        raise BadRequest(
            f"{len(raw)} raw_input_contents for {len(request.inputs) - typed} inputs without contents: "
            "give one per such input, in order"
        )
    inputs: dict[str, np.ndarray] = {}
    next_raw = 0
    for tensor in request.inputs:
        name, datatype, shape = v2_tensors.check_header(tensor.name, tensor.datatype, list(tensor.shape))
        if name in inputs:
            raise BadRequest(f"input {name} is given twice")
        _check_parameters(tensor.parameters, f"input {name}")
        as_str = _as_str(tensor.parameters)
        if tensor.HasField("contents"):
            inputs[name] = _from_contents(name, datatype, shape, tensor.contents, as_str)
        else:
            inputs[name] = v2_tensors.from_raw(name, datatype, shape, raw[next_raw], as_str)
            next_raw += 1
    return inputs


def _from_contents(name: str, datatype: str, shape: list[int], contents: Any, as_str: bool) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise BadRequest(f"input {name}: {datatype} has no typed contents field: send it in raw_input_contents")
    values = getattr(contents, field)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(values) != count:
        raise BadRequest(f"input {name}: {len(values)} values in contents.{field}, but shape {shape} holds {count}")
    if datatype == v2_tensors.BYTES:
        try:
            items = [v.decode("utf-8") if as_str else bytes(v) for v in values]
        except UnicodeDecodeError:
            raise BadRequest(f"input {name}: content_type str, but an element is not UTF-8") from None
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = v2_tensors.NUMERIC[datatype]
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except OverflowError:
        raise BadRequest(f"input {name}: a value is out of range for {datatype}") from None


def requested_outputs(request: Any, outputs: dict[str, np.ndarray]) -> list[str]:
    """The outputs to send, in order (all of them when the request names none)."""
    if not request.outputs:
        return list(outputs)
    names = []
    for output in request.outputs:
        _check_parameters(output.parameters, f"output {output.name}")
        names.append(output.name)
    unknown = [name for name in names if name not in outputs]
    if unknown:
        raise BadRequest(f"unknown output(s) {', '.join(unknown)} requested: the model has {', '.join(outputs)}")
    return names


def fill_response(response: Any, outputs: dict[str, np.ndarray], names: list[str]) -> None:
    """Add the named outputs to ``response``: header per output, data in raw_output_contents."""
    for name in names:
        array = outputs[name]
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = v2_tensors.datatype_of(array.dtype)
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(v2_tensors.to_raw(array))


def tensor_metadata(target: Any, spec: dict[str, Any]) -> None:
    entry = target.add()
    entry.name = spec["name"]
    entry.datatype = spec["datatype"]
    entry.shape.extend(spec["shape"])

