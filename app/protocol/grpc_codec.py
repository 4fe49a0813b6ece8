"""The gRPC messages: MindSpore Serving's ``Tensor`` <-> numpy, and the reply structure.

Server side (PROTOCOL.md section 5):

* `decode_instances` turns a ``PredictRequest``'s instances into the values stages
  receive, as the REST codec does: numeric and bool tensors become numpy arrays
  (0-d for an empty ``dims``), read straight from the message's bytes with
  ``np.frombuffer`` (no copy of the tensor data); ``MS_STRING`` becomes a ``str``;
  ``MS_BYTES`` a 1-D uint8 array. Every check fails the whole request, in MindSpore
  Serving's words (``Cannot find input ...``, ``Instances input x check failed,
  detail: ...``).
* `build_reply` fills a ``PredictReply``: all instances fine -> one ``Instance``
  each, no ``ErrorMsg``; some failed -> one ``ErrorMsg`` per instance (code 0 for the
  good ones) and one ``Instance`` per instance (empty for the failed ones); all
  failed for one shared cause -> one ``ErrorMsg``, no instances (as `rest.build_reply`
  reports one top-level ``error_msg``).
* `error_reply` is the whole-request failure: one ``ErrorMsg`` with a non-zero code.

Client side (`mserve.client`): `encode_value` and `decode_tensor_value`, with the
conversions of MindSpore's own client.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import BadRequest, InstanceError
from ..register import MethodDef
from . import ms_service_pb2 as pb
from .codec import MAX_DIMS

# DataType enum <-> numpy dtype (little-endian on the wire, which numpy reads natively here).
DTYPES: dict[int, np.dtype] = {
    pb.MS_BOOL: np.dtype(np.bool_),
    pb.MS_INT8: np.dtype("<i1"),
    pb.MS_UINT8: np.dtype("<u1"),
    pb.MS_INT16: np.dtype("<i2"),
    pb.MS_UINT16: np.dtype("<u2"),
    pb.MS_INT32: np.dtype("<i4"),
    pb.MS_UINT32: np.dtype("<u4"),
    pb.MS_INT64: np.dtype("<i8"),
    pb.MS_UINT64: np.dtype("<u8"),
    pb.MS_FLOAT16: np.dtype("<f2"),
    pb.MS_FLOAT32: np.dtype("<f4"),
    pb.MS_FLOAT64: np.dtype("<f8"),
}
_ENUM_OF: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): enum for enum, dt in DTYPES.items()}
_BYTES_TYPES = (pb.MS_STRING, pb.MS_BYTES)

# MindSpore Serving's status codes (ErrorMsg.error_code): FAILED, INVALID_INPUTS, SYSTEM_ERROR.
FAILED, INVALID_INPUTS, SYSTEM_ERROR = 1, 2, 3
_REST_PREFIX = "Parser request failed, "


def error_code(status: int) -> int:
    """The ErrorMsg code for an outcome's HTTP-like status (never 0)."""
    if status >= 500:
        return SYSTEM_ERROR if status == 500 else FAILED  # 503 queue full / 504 time out: FAILED, as MindSpore
    return INVALID_INPUTS


def error_text(message: str) -> str:
    """The REST text without the REST parser's ``Parser request failed, `` prefix."""
    return message[len(_REST_PREFIX):] if message.startswith(_REST_PREFIX) else message


def dtype_name(dtype: int) -> str:
    return pb.DataType.Name(dtype) if dtype in pb.DataType.values() else str(dtype)


# --------------------------------------------------------------------------- server: decode


def decode_instances(request: Any, method: MethodDef, servable: str) -> list[list[Any]]:
    """The method's inputs of every instance of ``request``; `BadRequest` (the whole
    request fails, as in MindSpore Serving) for a missing input or a bad tensor."""
    if not request.instances:
        raise BadRequest(
            f"Instances count of request cannot be 0, servable: {servable}, method: {method.name}"
        )
    decoded = []
    for instance in request.instances:
        if instance.output_buffers:
            raise BadRequest(
                "output_buffers (shared-memory outputs) are not supported by mserve; "
                "leave them out and read the outputs from the reply"
            )
        items = instance.items
        values = []
        for name in method.input_names:
            if name not in items:
                raise BadRequest(
                    f"Cannot find input {name} in instance input , servable {servable}, method {method.name}"
                )
            try:
                values.append(decode_tensor(items[name]))
            except BadRequest as exc:
                raise BadRequest(f"Instances input {name} check failed, detail: {exc.message}") from None
        decoded.append(values)
    return decoded


def decode_tensor(tensor: Any) -> Any:
    """One request ``Tensor`` as a stage value (MindSpore's CheckRequestTensor rules)."""
    dims = list(tensor.shape.dims)
    dtype = tensor.dtype
    if dtype in _BYTES_TYPES:
        if len(tensor.bytes_val) != 1:
            raise BadRequest("Instance tensor check failed: bytes or string type shape batch size can only be 1")
        if dims and dims != [1]:
            raise BadRequest(
                "Instance tensor check failed: bytes or string type input  shape can only be (1,) or empty, "
                f"but given shape is {dims}"
            )
        raw = tensor.bytes_val[0]
        if dtype == pb.MS_BYTES:
            return np.frombuffer(raw, dtype=np.uint8)  # what stages get for bytes (codec.decode_b64_object)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("Tensor check failed: MS_STRING value is not valid UTF-8") from None
    if len(dims) > MAX_DIMS:
        raise BadRequest(f"Tensor check failed: input shape has {len(dims)} dimensions, more than the {MAX_DIMS} "
                         "a tensor can have")
    zero_seen = False
    for dim in dims:
        if dim < 0 or zero_seen:
            raise BadRequest(f"Tensor check failed: input  shape {dims} invalid")
        zero_seen = dim == 0
    numpy_dtype = DTYPES.get(dtype)
    if numpy_dtype is None:
        # MindSpore prints every type it cannot size as proto::MS_UNKNOWN; the number follows.
        raise BadRequest(f"Tensor check failed: input data type proto::MS_UNKNOWN invalid (dtype {dtype})")
    if tensor.WhichOneof("tensor_data") == "shm_data":
        raise BadRequest("Tensor check failed: shared-memory tensors (shm_data) are not supported by mserve; send data")
    data = tensor.data
    count = math.prod(dims)  # exact, where np.prod would wrap around
    if count * numpy_dtype.itemsize != len(data):
        raise BadRequest(
            f"Tensor check failed: input data size {len(data)} invalid (dtype {dtype_name(dtype)}, "
            f"shape {dims} needs {count * numpy_dtype.itemsize} bytes)"
        )
    return np.frombuffer(data, dtype=numpy_dtype).reshape(dims)


# --------------------------------------------------------------------------- server: reply


class OutputError(Exception):
    """An output value the wire cannot carry."""


def fill_tensor(tensor: Any, value: Any) -> None:
    """Write one value into a ``Tensor`` message, with MindSpore's conversions: numpy
    arrays keep dtype and shape (0-d: empty ``dims``); Python bool/int/float are
    MS_BOOL/MS_INT64/MS_FLOAT64 scalars; ``str`` and ``bytes`` are one ``bytes_val``
    item with empty ``dims``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        tensor.dtype = pb.MS_BYTES
        tensor.bytes_val.append(bytes(value))
        return
    if isinstance(value, str):
        tensor.dtype = pb.MS_STRING
        tensor.bytes_val.append(value.encode("utf-8"))
        return
    if isinstance(value, bool):
        array = np.asarray(value, dtype=np.bool_)
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            array = np.asarray(value, dtype=np.int64)
        elif 0 <= value < 2**64:
            array = np.asarray(value, dtype=np.uint64)
        else:
            raise OutputError(f"output integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        array = np.asarray(value, dtype=np.float64)
    elif isinstance(value, (np.ndarray, np.generic, list, tuple)) or hasattr(value, "__array__"):
        try:
            array = np.asarray(value)
        except ValueError as exc:
            raise OutputError(f"output cannot be a tensor: {exc}") from None
    else:
        raise OutputError(f"output type {type(value).__name__} cannot be sent as a Tensor")
    kind = array.dtype.kind
    if kind in "US":
        if array.size != 1:
            raise OutputError(f"output {array.dtype} array of shape {list(array.shape)}: str and bytes must be one item")
        fill_tensor(tensor, array.reshape(()).item())
        return
    enum = _ENUM_OF.get((kind, array.dtype.itemsize)) if kind in "biuf" else None
    if enum is None:
        raise OutputError(f"output dtype {array.dtype} has no MindSpore Serving data type")
    tensor.dtype = enum
    tensor.shape.dims.extend(array.shape)
    tensor.data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def build_reply(reply: Any, method: MethodDef, results: Sequence[Sequence[Any] | InstanceError]) -> int:
    """Fill ``reply`` (a PredictReply whose servable_spec is already set) from the
    per-instance results; returns the outcome's HTTP-like status (for metrics)."""
    instances = []
    errors: list[InstanceError | None] = []
    for result in results:
        instance = pb.Instance()
        error = result if isinstance(result, InstanceError) else None
        if error is None:
            position = 0
            try:
                for position, (name, value) in enumerate(zip(method.output_names, result)):  # type: ignore[arg-type]
                    fill_tensor(instance.items[name], value)
            except OutputError as exc:
                instance = pb.Instance()
                error = InstanceError(method.unsendable(position, exc), status=500)
        instances.append(instance)
        errors.append(error)

    failed = [e for e in errors if e is not None]
    if not failed:
        reply.instances.extend(instances)
        return 200
    status = max(e.status for e in failed)
    causes = {e.cause for e in failed}
    if len(failed) == len(errors) and len(causes) == 1:
        # One shared cause: reported once, as MindSpore merges identical instance errors.
        message = causes.pop() if len(failed) > 1 else failed[0].message
        set_error(reply, status, message)
        return status
    reply.instances.extend(instances)
    for error in errors:
        entry = reply.error_msg.add()
        if error is not None:
            entry.error_code = error_code(error.status)
            entry.error_msg = error_text(error.message).encode("utf-8")
    return 200 if len(failed) < len(errors) else status


def set_error(reply: Any, status: int, message: str) -> None:
    """Make ``reply`` a whole-request failure: one ErrorMsg with a non-zero code, no instances."""
    del reply.instances[:]
    del reply.error_msg[:]
    entry = reply.error_msg.add()
    entry.error_code = error_code(status)
    entry.error_msg = (error_text(message) or "Predict failed").encode("utf-8")


# --------------------------------------------------------------------------- client side


def encode_value(value: Any, tensor: Any) -> None:
    """A client input as a request ``Tensor``, exactly as MindSpore's client builds it:
    numpy arrays and numpy scalars keep dtype and shape; Python bool/int/float become
    a shape-``[1]`` array (numpy's default dtype: bool, int64, float64); ``str`` and
    ``bytes`` are one ``bytes_val`` item with ``dims [1]``."""
    if isinstance(value, (np.ndarray, np.number, np.bool_)):
        array = np.asarray(value)
    elif isinstance(value, str):
        tensor.dtype = pb.MS_STRING
        tensor.shape.dims.append(1)
        tensor.bytes_val.append(value.encode("utf-8"))
        return
    elif isinstance(value, (bool, int, float)):
        array = np.array((value,))
    elif isinstance(value, bytes):
        tensor.dtype = pb.MS_BYTES
        tensor.shape.dims.append(1)
        tensor.bytes_val.append(value)
        return
    else:
        raise RuntimeError("Not support value type " + str(type(value)))
    enum = _ENUM_OF.get((array.dtype.kind, array.dtype.itemsize)) if array.dtype.kind in "biuf" else None
    if enum is None:
        raise RuntimeError("Unknown data type " + str(array.dtype))
    tensor.dtype = enum
    tensor.shape.dims.extend(array.shape)
    tensor.data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_tensor_value(tensor: Any) -> Any:
    """A reply ``Tensor`` as MindSpore's client returns it: a read-only numpy array
    over the message's bytes, ``str`` for MS_STRING, ``bytes`` for MS_BYTES (a list
    when there are several items)."""
    if tensor.dtype in _BYTES_TYPES:
        items = [bytes.decode(b) if tensor.dtype == pb.MS_STRING else b for b in tensor.bytes_val]
        return items[0] if len(items) == 1 else items
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise RuntimeError(f"reply tensor has unknown data type {dtype_name(tensor.dtype)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(list(tensor.shape.dims))
