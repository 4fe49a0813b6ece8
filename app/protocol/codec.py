"""The wire codec: request JSON values to Python/numpy values and results back.

Shared by the server and the client side (CLI ``invoke``/``encode``) so the format
is written once. Rules, order of checks and error texts follow PROTOCOL.md
sections 2 (2.3: MindSpore Serving's parse order) and 3:

* JSON int -> int32, float -> float32, bool -> bool, string -> ``str``; rectangular
  nested arrays of one leaf kind -> numpy tensors.
* ``{"b64": ..., "type": ..., "shape": ...}`` -> typed tensor (a scalar without
  ``shape``), ``str`` or bytes (a `BytesArray`: a 1-D uint8 array in stages).
* Results: numpy arrays -> nested lists / scalars, float32 and float16 printed as the
  shortest decimal that round-trips in their own precision, ``bytes`` and
  `BytesArray` -> ``{"b64"}``.
  NaN and infinities have no JSON form (orjson, like MindSpore Serving's JSON library,
  would print ``null``, which a client cannot tell from a missing value): an output
  holding one is a `NonFiniteOutput` naming where, so that instance fails visibly
  (a 400: the inputs took the model out of its float range).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

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
# The wire type of a JSON leaf (MindSpore Serving: int -> int32, float -> float32).
_LEAF_TYPES = {int: "int32", float: "float32", bool: "bool", str: "str"}
# MindSpore names a type by its first name in sorted order: fp32 -> float32.
_CANONICAL = {"fp16": "float16", "fp32": "float32", "fp64": "float64"}
_TEXT_TYPES = ("str", "bytes")
_FLOAT16 = np.dtype(np.float16)
_B64_KEY_SET = frozenset(("b64", "type", "shape"))


def _numpy_max_dims() -> int:
    """The most dimensions a numpy array may have (64 from numpy 2, 32 before)."""
    for dims in (64, 32):
        try:
            np.empty((1,) * dims)
            return dims
        except ValueError:
            continue
    return 32


MAX_DIMS = _numpy_max_dims()


class ValueError_(BadRequest):
    """A request value that cannot be decoded; the parser adds instance and input."""


class BytesArray(np.ndarray):
    """A bytes value from the wire as stages see it: a 1-D uint8 array (``.tobytes()``
    gives the bytes) that remembers it is bytes, so a stage passing it straight
    through to an output sends ``{"b64": ...}`` back, as MindSpore Serving does.
    Arithmetic on it gives plain arrays."""

    def __array_wrap__(self, array: Any, context: Any = None, return_scalar: bool = False) -> Any:
        plain = array.view(np.ndarray) if isinstance(array, np.ndarray) else array
        return plain[()] if return_scalar else plain


def bytes_value(raw: bytes) -> BytesArray:
    return np.frombuffer(raw, dtype=np.uint8).view(BytesArray)


class ShapedText(NamedTuple):
    """A str or bytes value whose wire shape is neither ``()`` nor ``(1,)`` (``[["s"]]``,
    or a b64 object with ``"shape": [1, 1]``). Parsing accepts it, as MindSpore
    Serving does; the method's input check refuses it (PROTOCOL.md 2.3 step 3), and
    it is ignored where it is not an input of the method."""

    value: Any
    shape: tuple[int, ...]


# --------------------------------------------------------------------------- decode


def decode_value(value: Any) -> Any:
    """Turn one JSON instance value into what stages receive, checking it in
    MindSpore Serving's order (PROTOCOL.md 2.3 step 2).

    Raises `ValueError_` with MindSpore Serving's wording (without the ``Parser
    request failed, `` prefix); the caller adds the instance index and input name.
    """
    kind = type(value)
    if kind is list:
        return _decode_array(value)
    if kind is dict:
        return decode_b64_object(value)
    if kind is float:
        if -_FLOAT32_OVERFLOW < value < _FLOAT32_OVERFLOW:
            return np.array(value, dtype=np.float32)
        return _float32(np.array(value, dtype=np.float64))  # raises
    if kind is bool:
        return np.array(value, dtype=np.bool_)
    if kind is int:
        _check_int32(value)
        return np.array(value, dtype=np.int32)
    if kind is str:
        return value
    # JSON null is the only other possibility.
    raise ValueError_("json value is null, it is not supported")


def _check_int32(value: int) -> None:
    # mserve refuses what MindSpore Serving would silently wrap around.
    if not _INT32_MIN <= value <= _INT32_MAX:
        raise ValueError_(f"json integer {value} is out of int32 range")


def _decode_array(value: list) -> Any:
    # Fast path: numpy builds an object array in C; one pass over the leaf types
    # tells whether the array is a clean rectangular tensor of one JSON kind. Anything
    # else takes the slow walk below, which finds the exact MindSpore error. (Nesting
    # deeper than numpy's dimension limit gives an object array of lists: slow path.)
    if value:
        try:
            obj = np.array(value, dtype=object)
        except ValueError:
            obj = None
        if obj is not None and obj.size and 0 not in obj.shape:
            # The leaves as a list: iterating it costs less than iterating the object array.
            flat = obj.ravel().tolist()
            kinds = set(map(type, flat))
            if len(kinds) == 1:
                leaf = kinds.pop()
                dtype = _LEAF_DTYPES.get(leaf)
                if dtype is not None:
                    if leaf is int:
                        return _int32_array(obj, flat)
                    if leaf is float:
                        return _float32_array(obj, flat)
                    return obj.astype(dtype)
    return _decode_array_slow(value)


# Up to this many leaves, range checks run on the Python list: a numpy reduction
# costs a few µs whatever the size (most requests carry a few values), Python's
# min/max about 15 ns a leaf.
_SMALL_ARRAY = 64


def _int32_array(obj: np.ndarray, flat: list) -> np.ndarray:
    """An object array of Python ints as int32, refusing any beyond int32's range."""
    if len(flat) > _SMALL_ARRAY:
        try:
            wide = obj.astype(np.int64)
        except OverflowError:  # beyond int64 (orjson parses up to uint64): refused below
            wide = None
        if wide is not None and wide.min() >= _INT32_MIN and wide.max() <= _INT32_MAX:
            return wide.astype(np.int32)
    high, low = max(flat), min(flat)
    if high > _INT32_MAX or low < _INT32_MIN:
        _check_int32(high if high > _INT32_MAX else low)
    return obj.astype(np.int32)


def _float32_array(obj: np.ndarray, flat: list) -> np.ndarray:
    """An object array of Python floats as float32 (see `_float32`)."""
    # JSON floats are finite (orjson refuses NaN and overflow): the largest magnitude
    # is max or -min. A failure goes through `_float32` too, which names the first.
    if len(flat) > _SMALL_ARRAY or max(flat) >= _FLOAT32_OVERFLOW or min(flat) <= -_FLOAT32_OVERFLOW:
        return _float32(obj.astype(np.float64))
    # object -> float32 rounds each double once, exactly as float64 -> float32 does.
    return obj.astype(np.float32)


def _object_type(node: Any) -> str | None:
    """The wire type of a b64 object in an array (``bytes`` without ``type``), or
    None when it is not one MindSpore knows."""
    if type(node) is not dict:
        return None
    name = node.get("type", "bytes")
    if type(name) is not str or name not in B64_TYPES:
        return None
    return _CANONICAL.get(name, name)


def _decode_array_slow(value: list) -> Any:
    """MindSpore Serving's array parse, check by check: the shape and the element
    type come from the first item at each level; then the array is walked against
    them, depth first. Iterative, so no nesting depth can exhaust the stack."""
    shape: list[int] = []
    node: Any = value
    while type(node) is list and node:
        shape.append(len(node))
        node = node[0]
    if not shape:
        raise ValueError_("json array, shape is empty")
    leaf = type(node)
    is_object = leaf is dict
    wire_type = _object_type(node) if is_object else _LEAF_TYPES.get(leaf)
    if wire_type is None:  # the first leaf is [], null, or an object of unknown type
        raise ValueError_("json array, data type is unknown")
    is_text = wire_type in _TEXT_TYPES
    if is_text and math.prod(shape) != 1:
        raise ValueError_("json array, string or bytes type only support one item")
    if is_object and not is_text:
        raise ValueError_("json array, item is object type, object only support string or bytes type")
    if not is_text and len(shape) > MAX_DIMS:
        raise ValueError_(
            f"json array, shape has {len(shape)} dimensions, more than the {MAX_DIMS} a tensor can have"
        )

    leaves: list[Any] = []
    last = len(shape) - 1
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if type(node) is not list:
            raise ValueError_("invalid json array: json type is not array")
        if len(node) != shape[depth]:
            raise ValueError_(
                f"invalid json array: json size is {len(node)}, the dim {depth} expected to be {shape[depth]}"
            )
        if depth < last:
            stack.extend((child, depth + 1) for child in reversed(node))
            continue
        for item in node:
            if is_object:
                item_type = _object_type(item)
                if item_type not in _TEXT_TYPES:
                    raise ValueError_("json array, object type only support string or bytes type")
                if item_type != wire_type:
                    raise ValueError_("json array, elements type is not equal")
                if "b64" not in item:
                    raise ValueError_("json object, 'b64' should be specified only one time")
                leaves.append(_decode_text(item["b64"], wire_type))
                continue
            kind = type(item)
            if kind not in _LEAF_TYPES:
                raise ValueError_("json array, data should be number, bool, string or bytes")
            if _LEAF_TYPES[kind] != wire_type:
                raise ValueError_("json array, elements type is not equal")
            if kind is int:
                _check_int32(item)
            leaves.append(item)

    if is_text:
        return leaves[0] if len(shape) == 1 else ShapedText(leaves[0], tuple(shape))
    if wire_type == "float32":
        return _float32(np.array(leaves, dtype=np.float64)).reshape(shape)
    return np.array(leaves, dtype=_LEAF_DTYPES[leaf]).reshape(shape)


def _float32(wide: np.ndarray) -> np.ndarray:
    """JSON floats as float32; one beyond float32's range is an error, not inf.
    (JSON has no NaN or infinity, so every float parsed is finite.)"""
    if wide.size and np.abs(wide).max() >= _FLOAT32_OVERFLOW:
        bad = wide.ravel()[np.abs(wide.ravel()) >= _FLOAT32_OVERFLOW][0]
        raise ValueError_(f"json float {float(bad)!r} is out of float32 range")
    return wide.astype(np.float32)


def decode_b64_object(obj: dict) -> Any:
    """Decode ``{"b64": ..., "type": ..., "shape": ...}`` (PROTOCOL.md 2.2), checking
    in MindSpore Serving's order: the keys (in sorted order, as its JSON library
    keeps them), then the type against the shape, then the base64 text and its size.
    A missing or empty ``shape`` is a scalar."""
    type_name = obj.get("type", "bytes")
    shape = obj.get("shape", ())
    # Fast path: only known keys, a known type and a shape of positive dims pass every
    # check below; anything else is checked in MindSpore's order, to find its error.
    if (
        "b64" in obj
        and obj.keys() <= _B64_KEY_SET
        and type(type_name) is str
        and type_name in B64_TYPES
        and (shape == () or (type(shape) is list and all(type(d) is int and 0 < d < 2**31 for d in shape)))
    ):
        shape = tuple(shape)
    else:
        _check_b64_object(obj)
        # MindSpore reads each dimension as a uint32 (2**32 wraps to 0).
        shape = tuple(d & 0xFFFFFFFF for d in shape)
    type_name = _CANONICAL.get(type_name, type_name)
    count = math.prod(shape)  # exact: np.prod would wrap around on huge shapes
    if type_name in _TEXT_TYPES:
        if count != 1:
            raise ValueError_(
                "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'"
            )
        text = _decode_text(obj["b64"], type_name)
        return text if len(shape) <= 1 else ShapedText(text, shape)

    raw = _b64decode(obj["b64"])
    dtype = np.dtype(B64_TYPES[type_name]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise ValueError_(
            f"size is not matched, decode base64 size:{len(raw)}; Given info: type:{type_name}; "
            f"type size:{dtype.itemsize}; element nums:{count}"
        )
    if len(shape) > MAX_DIMS:
        raise ValueError_(f"json object, key is 'shape', {len(shape)} dimensions, more than the {MAX_DIMS} a tensor can have")
    try:
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    except ValueError:  # a zero-size shape numpy cannot represent
        raise ValueError_(f"json object, key is 'shape', invalid shape value {list(shape)}") from None


def _check_b64_object(obj: dict) -> None:
    """The key checks of a b64 object, in MindSpore Serving's order."""
    if not obj:
        raise ValueError_("json object, value is empty")
    if len(obj) > 3:
        raise ValueError_("json object, items size is more than 3, only support specified ['b64', 'type', 'shape']")
    for key in sorted(obj):
        if key == "shape":
            _check_shape(obj[key])
        elif key == "type":
            name = obj[key]
            if type(name) is not str:
                raise ValueError_("json object, key is 'type', value should be string type")
            if name not in B64_TYPES:
                raise ValueError_(f"json object, specified type:'{name}' is illegal")
        elif key != "b64":
            raise ValueError_(f"json object, key is not ['b64', 'type', 'shape'], fail key:{key}")
    if "b64" not in obj:
        raise ValueError_("json object, 'b64' should be specified only one time")


def _check_shape(shape: Any) -> None:
    if type(shape) is not list:
        raise ValueError_("json object, key is 'shape', value should be array type")
    zero_before = False
    for dim in shape:
        if zero_before:  # nothing may follow a 0: [0] and [2, 0] are empty, [0, 1] is not a shape
            raise ValueError_(f"json object, key is 'shape', invalid shape value {_dump(shape)}")
        if type(dim) is not int or dim < 0:
            raise ValueError_("json object, key is 'shape', array value should be unsigned integer")
        wrapped = dim & 0xFFFFFFFF  # MindSpore reads each dimension as an int32 here
        if wrapped >= 2**31:
            raise ValueError_(
                f"json object, key is 'shape', number value should not be negative number, shape value: {_dump(shape)}"
            )
        zero_before = wrapped == 0


def _dump(value: Any) -> str:
    return orjson.dumps(value).decode()


def _b64decode(data: Any) -> bytes:
    if type(data) is not str:
        raise ValueError_("get scalar data failed, type is string, but json is not string type")
    try:
        return pybase64.b64decode(data, validate=True)
    except ValueError:
        shown = data if len(data) <= 64 else f"{data[:64]}... ({len(data)} characters)"
        raise ValueError_(f"'{shown}' is illegal b64 encode string") from None


def _decode_text(data: Any, type_name: str) -> Any:
    """The base64 text of a str or bytes value: ``str``, or bytes as a `BytesArray`."""
    raw = _b64decode(data)
    if type_name == "bytes":
        return bytes_value(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError_("the 'b64' value of type str is not valid UTF-8") from None


# --------------------------------------------------------------------------- encode


class OutputError(Exception):
    """A stage produced a value the wire cannot carry."""


class NonFiniteOutput(OutputError):
    """An output holds NaN or an infinity: in practice the inputs took the model out
    of its float range (1e38 + 1e38 in float32), so the client's to change (a 4xx)."""


def encode_value(value: Any) -> Any:
    """Turn one output value into something ``orjson`` (with numpy support) prints."""
    if isinstance(value, np.ndarray):
        if type(value) is BytesArray:  # a bytes input passed straight through
            return {"b64": pybase64.b64encode(value.tobytes()).decode("ascii")}
        return _encode_array(value)
    if isinstance(value, np.generic):
        return _encode_array(np.asarray(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"b64": pybase64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        raise OutputError(f"output integer {value} does not fit in 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteOutput(f"output value {value!r} has no JSON form (NaN and infinities cannot be sent)")
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
    if kind == "f" and array.dtype == _FLOAT16:  # a dtype, not np.float16: no conversion per call
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
    # Small arrays (most replies) are checked on a list: np.isfinite(...).all() costs
    # a few µs whatever the size. A failure is found again below, to name where.
    if array.size <= _SMALL_ARRAY and all(map(math.isfinite, array.ravel().tolist())):
        return
    finite = np.isfinite(array)
    if not finite.all():
        where = np.argwhere(~finite)[0].tolist() if array.ndim else []
        value = array[tuple(where)] if array.ndim else array[()]
        raise NonFiniteOutput(
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
