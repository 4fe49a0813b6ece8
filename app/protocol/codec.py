"""The wire codec: request JSON values to Python/numpy values and results back.

Shared by the server and the client side (CLI ``invoke``/``encode``) so the format
is written once. Rules and error texts follow PROTOCOL.md sections 2 and 3:

* JSON int -> int32, float -> float32, bool -> bool, string -> ``str``; rectangular
  nested arrays of one leaf kind -> numpy tensors.
* ``{"b64": ..., "type": ..., "shape": ...}`` -> typed tensor, ``str`` or ``bytes``
  (bytes arrive in stages as a 1-D uint8 array).
* Results: numpy arrays -> nested lists / scalars, float32 and float16 printed as the
  shortest decimal that round-trips in their own precision, ``bytes`` -> ``{"b64"}``.
  NaN and infinities have no JSON form (orjson, like MindSpore Serving's JSON library,
  would print ``null``, which a client cannot tell from a missing value): an output
  holding one is an `OutputError` naming where, so that instance fails visibly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pybase64

from ..errors import BadRequest

# Request type names -> numpy dtypes (MindSpore Serving's list, with its aliases).
B64_TYPES: dict[str, Any] = {
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float16": np.float16,
    "fp16": np.float16,
    "float32": np.float32,
    "fp32": np.float32,
    "float64": np.float64,
    "fp64": np.float64,
    "bool": np.bool_,
    "str": str,
    "bytes": bytes,
}

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
# The smallest magnitude that float32 rounds to infinity: float32's largest finite
# value plus half a unit in its last place (ties round to even, here to infinity).
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
_LEAF_DTYPES = {float: np.float32, int: np.int32, bool: np.bool_}


class ValueError_(BadRequest):
    """A request value that cannot be decoded; the pipeline adds instance and input."""


# --------------------------------------------------------------------------- decode


def decode_value(value: Any) -> Any:
    """Turn one JSON instance value into what stages receive.

    Raises `ValueError_` with MindSpore Serving's wording; the caller prefixes the
    instance index and input name.
    """
    kind = type(value)
    if kind is list:
        return _decode_array(value)
    if kind is dict:
        return decode_b64_object(value)
    if kind is float:
        return _float32(np.array(value, dtype=np.float64))
    if kind is bool:
        return np.array(value, dtype=np.bool_)
    if kind is int:
        _check_int32(value)
        return np.array(value, dtype=np.int32)
    if kind is str:
        return value
    # JSON null is the only other possibility.
    raise ValueError_("json value null is not supported, data should be number, bool, string or bytes")


def _check_int32(value: int) -> None:
    if not _INT32_MIN <= value <= _INT32_MAX:
        raise ValueError_(f"json integer {value} is out of int32 range")


def _decode_array(value: list) -> Any:
    # Fast path: numpy builds an object array in C; one pass over the leaf types
    # tells whether the array is a clean rectangular tensor of one JSON kind. Anything
    # else takes the slow walk below, which finds the exact MindSpore error.
    if value:
        try:
            obj = np.array(value, dtype=object)
        except ValueError:
            obj = None
        if obj is not None and obj.size and 0 not in obj.shape:
            kinds = set(map(type, obj.ravel()))
            if len(kinds) == 1:
                leaf = kinds.pop()
                dtype = _LEAF_DTYPES.get(leaf)
                if dtype is not None:
                    if leaf is int:
                        try:
                            wide = obj.astype(np.int64)
                        except OverflowError:  # beyond int64 (orjson parses up to uint64)
                            wide = None
                        if wide is None or wide.min() < _INT32_MIN or wide.max() > _INT32_MAX:
                            flat = obj.ravel().tolist()
                            _check_int32(max(flat) if max(flat) > _INT32_MAX else min(flat))
                        return wide.astype(np.int32)
                    if leaf is float:
                        return _float32(obj.astype(np.float64))
                    return obj.astype(dtype)
    return _decode_array_slow(value)


def _array_shape(value: list) -> list[int]:
    shape = []
    node: Any = value
    while type(node) is list:
        if not node:
            raise ValueError_("json array, shape is empty")
        shape.append(len(node))
        node = node[0]
    return shape


def _decode_array_slow(value: list) -> Any:
    shape = _array_shape(value)
    leaves: list = []
    first_kind: list = []

    def walk(node: Any, dim: int) -> None:
        if type(node) is list:
            if dim >= len(shape):
                raise ValueError_("json array, data should be number, bool, string or bytes")
            if len(node) != shape[dim]:
                raise ValueError_(
                    f"invalid json array: json size is {len(node)}, the dim {dim} expected to be {shape[dim]}"
                )
            for item in node:
                walk(item, dim + 1)
            return
        if dim < len(shape):
            raise ValueError_("invalid json array: json type is not array")
        kind = type(node)
        if kind not in (int, float, bool, str, dict):
            raise ValueError_("json array, data should be number, bool, string or bytes")
        if not first_kind:
            first_kind.append(kind)
        elif first_kind[0] is not kind:
            raise ValueError_("json array, elements type is not equal")
        leaves.append(node)

    walk(value, 0)
    kind = first_kind[0]
    if kind in (str, dict):
        if len(leaves) > 1:
            raise ValueError_("json array, string or bytes type only support one item")
        if len(shape) != 1:
            raise ValueError_("bytes or string type input  shape can only be (1,) or empty")
        return leaves[0] if kind is str else decode_b64_object(leaves[0])
    if kind is int:
        for leaf in leaves:
            _check_int32(leaf)
    if kind is float:
        return _float32(np.array(leaves, dtype=np.float64)).reshape(shape)
    return np.array(leaves, dtype=_LEAF_DTYPES[kind]).reshape(shape)


def _float32(wide: np.ndarray) -> np.ndarray:
    """JSON floats as float32; one beyond float32's range is an error, not inf.
    (JSON has no NaN or infinity, so every float parsed is finite.)"""
    if wide.size and np.abs(wide).max() >= _FLOAT32_OVERFLOW:
        bad = wide.ravel()[np.abs(wide.ravel()) >= _FLOAT32_OVERFLOW][0]
        raise ValueError_(f"json float {float(bad)!r} is out of float32 range")
    return wide.astype(np.float32)


def decode_b64_object(obj: dict) -> Any:
    """Decode ``{"b64": ..., "type": ..., "shape": ...}`` (PROTOCOL.md 2.2)."""
    if "b64" not in obj:
        raise ValueError_("'b64' should be specified only one time")
    data = obj["b64"]
    if type(data) is not str:
        raise ValueError_("get scalar data failed, type is string, but json is not string type")
    type_name = obj.get("type", "bytes")
    if type(type_name) is not str:
        raise ValueError_("json object, key is 'type', value should be string type")
    target = B64_TYPES.get(type_name)
    if target is None:
        raise ValueError_(f"json object, specified type:'{type_name}' is illegal")
    shape = _b64_shape(obj)
    try:
        raw = pybase64.b64decode(data, validate=True)
    except ValueError:
        raise ValueError_("the 'b64' value is illegal b64 encode string") from None

    if target is str or target is bytes:
        if shape is not None and int(np.prod(shape)) != 1:
            raise ValueError_(
                "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'"
            )
        if target is bytes:
            return np.frombuffer(raw, dtype=np.uint8)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError_("the 'b64' value of type str is not valid UTF-8") from None

    dtype = np.dtype(target).newbyteorder("<")
    if shape is None:
        shape = [1]
    count = math.prod(shape)  # exact: np.prod would wrap around on huge shapes
    if count == 0 and raw:
        raise ValueError_("json object, key is 'shape', invalid shape value")
    if len(raw) != count * dtype.itemsize:
        raise ValueError_(
            f"size is not matched: type {type_name} and shape {list(shape)} need "
            f"{count * dtype.itemsize} bytes, got {len(raw)}"
        )
    try:
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    except ValueError:  # a zero-size shape numpy cannot represent, e.g. [0, 2**63]
        raise ValueError_(f"json object, key is 'shape', invalid shape value {list(shape)}") from None


def _b64_shape(obj: dict) -> list[int] | None:
    if "shape" not in obj:
        return None
    shape = obj["shape"]
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise ValueError_("json object, key is 'shape', array value should be unsigned integer")
    return shape


# --------------------------------------------------------------------------- encode


class OutputError(Exception):
    """A stage produced a value the wire cannot carry."""


def encode_value(value: Any) -> Any:
    """Turn one output value into something ``orjson`` (with numpy support) prints."""
    if isinstance(value, np.ndarray):
        return _encode_array(value)
    if isinstance(value, np.generic):
        return _encode_array(np.asarray(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b64": pybase64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        raise OutputError(f"output integer {value} does not fit in 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise OutputError(f"output value {value!r} has no JSON form (NaN and infinities cannot be sent)")
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if hasattr(value, "__array__"):  # jax.Array and friends
        return _encode_array(np.asarray(value))
    raise OutputError(f"output type {type(value).__name__} cannot be encoded as JSON")


def _encode_array(array: np.ndarray) -> Any:
    kind = array.dtype.kind
    if kind not in "biuf":
        if kind in "US" and array.size == 1:
            item = array.reshape(()).item()
            return item if isinstance(item, str) else {"b64": pybase64.b64encode(item).decode("ascii")}
        raise OutputError(f"output dtype {array.dtype} cannot be encoded as JSON")
    if kind == "f":
        _check_finite(array)
    if array.dtype == np.float16:
        # orjson prints float16 through float32 (0.1 -> 0.099975586); go through
        # numpy's shortest float16 repr so the client sees what the model meant.
        # str() of a numpy float16 is its shortest round-trip decimal ("0.1").
        shortest = np.array([float(str(x)) for x in array.ravel()], np.float64)
        array = shortest.reshape(array.shape)
    if array.ndim == 0:
        return array[()]
    if not array.flags.c_contiguous or array.dtype.byteorder == ">":
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    return array


def _check_finite(array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        where = np.argwhere(~finite)[0].tolist() if array.ndim else []
        value = array[tuple(where)] if array.ndim else array[()]
        raise OutputError(
            f"output value {float(value)!r} at index {where} has no JSON form (NaN and infinities cannot be sent)"
        )


def dumps(obj: Any) -> bytes:
    """Serialize a reply body (numpy arrays allowed inside)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


# --------------------------------------------------------------------------- client side


def encode_tensor(array: np.ndarray) -> dict:
    """A numpy array as a typed b64 object (what ``mserve encode x.npy`` prints)."""
    array = np.ascontiguousarray(array)
    type_name = "bool" if array.dtype == np.bool_ else array.dtype.name
    if type_name not in B64_TYPES:
        raise ValueError(f"dtype {array.dtype} has no wire type; allowed: {', '.join(B64_TYPES)}")
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"b64": pybase64.b64encode(data).decode("ascii"), "type": type_name, "shape": list(array.shape)}


def encode_bytes(data: bytes) -> dict:
    """Raw bytes (an image, a file) as a b64 object of type bytes."""
    return {"b64": pybase64.b64encode(data).decode("ascii"), "type": "bytes"}


def decode_reply_value(value: Any) -> Any:
    """Client side: a reply value back to numpy/bytes where the wire says so."""
    if isinstance(value, dict) and "b64" in value:
        return pybase64.b64decode(value["b64"])
    if isinstance(value, list):
        try:
            return np.array(value)
        except ValueError:
            return value
    return value
