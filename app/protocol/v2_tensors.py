"""Open Inference Protocol (KServe v2) tensors <-> numpy arrays, for REST and gRPC alike.

An OIP tensor is a name, a ``datatype`` (``BOOL``, ``UINT8``..``UINT64``,
``INT8``..``INT64``, ``FP16``/``FP32``/``FP64``, ``BYTES``), a ``shape`` and its
elements in row-major order. The elements come three ways, all handled here:

* JSON ``data``: a flat or nested list of numbers, booleans or strings (`from_json`);
* raw bytes: the binary tensor data extension (REST) and ``raw_input_contents`` (gRPC),
  little-endian, BOOL one byte each, BYTES elements each a 4-byte little-endian length
  followed by the bytes (`from_raw`, `to_raw`);
* gRPC's typed ``contents`` (`from_contents` in `mserve.protocol.v2_grpc`).

Numeric tensors become numpy arrays of the datatype's dtype. BYTES tensors become
numpy object arrays whose elements are ``bytes``, or ``str`` when they came as JSON
strings or the input's ``content_type`` parameter is ``str`` (MLServer's convention):
MindSpore's protocol tells str and bytes apart, OIP has one type for both.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import numpy as np

from ..errors import BadRequest

BYTES = "BYTES"
NUMERIC: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMERIC, BYTES)
_DATATYPE_OF = {(dtype.kind, dtype.itemsize): name for name, dtype in NUMERIC.items()}
_LENGTH = struct.Struct("<I")


class OutputError(Exception):
    """A value a method returned that no OIP tensor can carry."""


def datatype_of(dtype: np.dtype) -> str:
    """The OIP datatype of a numpy dtype (object, str and bytes arrays are BYTES)."""
    if dtype.kind in "OUS":
        return BYTES
    name = _DATATYPE_OF.get((dtype.kind, dtype.itemsize)) if dtype.kind in "biuf" else None
    if name is None:
        raise OutputError(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def check_header(name: Any, datatype: Any, shape: Any) -> tuple[str, str, list[int]]:
    """The name, datatype and shape of one input, or `BadRequest` naming what is wrong."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"an input has no name (got {name!r}): every input needs \"name\"")
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(f"input {name}: shape must be a list of non-negative integers, got {shape!r}")
    return name, datatype, list(shape)


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview, as_str: bool = False) -> np.ndarray:
    """An input tensor from its raw bytes (binary extension, ``raw_input_contents``)."""
    count = math.prod(shape)
    if datatype == BYTES:
        return _shaped(name, shape, split_bytes(name, raw, count, as_str))
    dtype = NUMERIC[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name}: {len(raw)} bytes of data, but {datatype} of shape {list(shape)} takes "
            f"{count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        array = np.frombuffer(raw, dtype=np.uint8).astype(np.bool_)
    else:
        array = np.frombuffer(raw, dtype=dtype)
    return array.reshape(shape)


def split_bytes(name: str, raw: bytes | memoryview, count: int, as_str: bool) -> list[Any]:
    """BYTES elements from their length-prefixed serialization."""
    view = memoryview(raw)
    items: list[Any] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequest(f"input {name}: BYTES data ends inside an element's 4-byte length")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise BadRequest(f"input {name}: a BYTES element of {size} bytes runs past the end of the data")
        items.append(_text(name, bytes(view[offset:offset + size])) if as_str else bytes(view[offset:offset + size]))
        offset += size
    if len(items) != count:
        raise BadRequest(f"input {name}: {len(items)} BYTES elements, but the shape holds {count}")
    return items


def from_json(name: str, datatype: str, shape: Sequence[int], data: Any, as_str: bool = True) -> np.ndarray:
    """An input tensor from JSON ``data`` (flat or nested, row-major)."""
    flat = _flatten(name, data)
    count = math.prod(shape)
    if len(flat) != count:
        raise BadRequest(f"input {name}: {len(flat)} values in data, but shape {list(shape)} holds {count}")
    if datatype == BYTES:
        items = []
        for item in flat:
            if isinstance(item, str):
                items.append(item if as_str else item.encode("utf-8"))
            else:
                raise BadRequest(f"input {name}: BYTES data must be strings, got {type(item).__name__}")
        return _shaped(name, shape, items)
    dtype = NUMERIC[datatype]
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise BadRequest(f"input {name}: BOOL data must be true or false")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise BadRequest(f"input {name}: {datatype} data must be numbers")
    elif dtype.kind in "iu" and not all(isinstance(v, int) for v in flat):
        raise BadRequest(f"input {name}: {datatype} data must be integers")
    try:
        array = np.array(flat, dtype=dtype)
    except OverflowError:
        raise BadRequest(f"input {name}: a value is out of range for {datatype}") from None
    return array.reshape(shape)


def _flatten(name: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise BadRequest(f"input {name}: data must be a list, got {type(data).__name__}")
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _shaped(name: str, shape: Sequence[int], items: list[Any]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"input {name}: content_type str, but an element is not UTF-8") from None


# --------------------------------------------------------------------------- outputs


def as_output(value: Any) -> np.ndarray:
    """A method's output value (array, numpy or Python scalar, str, bytes) as an array:
    numeric arrays keep their dtype; str and bytes become a BYTES element."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        return _shaped("", (), [value if isinstance(value, str) else bytes(value)])
    if isinstance(value, bool):
        return np.asarray(value, dtype=np.bool_)
    if isinstance(value, int):
        if -(2**63) <= value < 2**63:
            return np.asarray(value, dtype=np.int64)
        if 0 <= value < 2**64:
            return np.asarray(value, dtype=np.uint64)
        raise OutputError(f"integer {value} does not fit in 64 bits")
    if isinstance(value, float):
        return np.asarray(value, dtype=np.float64)
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise OutputError(f"cannot be a tensor: {exc}") from None
    if array.dtype.kind in "US":
        return array.astype(object)
    datatype_of(array.dtype)
    return array


def to_raw(array: np.ndarray) -> bytes:
    """An output tensor's raw bytes (binary extension, ``raw_output_contents``)."""
    if datatype_of(array.dtype) == BYTES:
        parts = []
        for item in array.reshape(-1):
            data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if array.dtype.kind == "b":
        return array.astype(np.uint8).tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def to_json(name: str, array: np.ndarray) -> list[Any]:
    """An output tensor's elements as a flat JSON list (BYTES as UTF-8 strings)."""
    flat = array.reshape(-1)
    if datatype_of(array.dtype) != BYTES:
        return flat.tolist()
    items = []
    for item in flat:
        if isinstance(item, str):
            items.append(item)
            continue
        try:
            items.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise OutputError(
                f"output {name} holds bytes that are not UTF-8 text, which JSON cannot carry: "
                "ask for it with the binary tensor data extension (parameters.binary_data: true)"
            ) from None
    return items
