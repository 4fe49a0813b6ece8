"""Fitting `invoke`'s inputs to the method's declared signature.

The server describes each method's inputs (``GET /model/{name}``: dtype and shape
where a model declares them). JSON integers travel as int32 and floats as float32
(PROTOCOL.md section 2), and a model input must get its exact dtype, so
``-i x1='[[1,2],[3,4]]'`` for a float32 input would be refused by the server. Here a
literal (or a ``.npy`` array) whose values convert exactly to the declared dtype is
sent as a typed tensor of that dtype; a value that would change (1.5 for an int32
input, a float64 that float32 cannot hold) is refused before sending, naming the
input, the expected and the given dtype. Inputs whose dtype is not declared (they
feed a Python stage) are sent as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .render import fail

if TYPE_CHECKING:  # numpy is imported when a command runs, not for --help
    import numpy as np


@dataclass
class NpyValue:
    """An ``@file.npy`` input, kept as an array until the signature is known."""

    array: np.ndarray
    path: Path


def find_method(description: dict[str, Any], version: int | None, method: str) -> dict[str, Any] | None:
    """The method's description in ``GET /model/{name}``'s answer (the latest
    version unless ``version``), or None."""
    versions = description.get("versions") or []
    wanted = version or description.get("latest_version")
    for entry in versions:
        if entry.get("version") == wanted:
            for described in entry.get("methods") or []:
                if described.get("name") == method:
                    return described
    return None


def conform_instances(instances: list[dict[str, Any]], method: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each instance with its values fitted to the declared input dtypes."""
    declared = {i["name"]: i.get("dtype") for i in (method or {}).get("inputs", [])}
    return [{name: conform(name, value, declared.get(name), index) for name, value in inst.items()}
            for index, inst in enumerate(instances)]


def conform(name: str, value: Any, dtype: str | None, index: int = 0) -> Any:
    """``value`` as the wire form of the declared ``dtype`` (unchanged when it is
    already that, or when nothing is declared)."""
    import numpy as np

    from mserve.protocol import codec

    where = f"input '{name}'" + (f" of instance {index}" if index else "")
    from_file = isinstance(value, NpyValue)
    must_retype = from_file  # arrays always travel as typed tensors
    if from_file:
        given = value.array
        source = f"{value.path} holds {given.dtype.name}"
    elif _is_literal(value):
        try:
            given = codec.decode_value(value)
        except Exception:
            # Ints and floats mixed ([1.5, 2]) are refused on the wire; as numbers
            # they may still fit the declared dtype. Anything else: the server says why.
            given = _mixed_numbers(value) if dtype else None
            if given is None:
                return value
            must_retype = True
        if not isinstance(given, np.ndarray):
            return value
        source = f"the JSON value is {given.dtype.name}"
    else:
        return value  # a string, a b64 object, bytes: sent as given
    if dtype is None or dtype not in codec.B64_TYPES or given.dtype.kind not in "biuf":
        return _tensor(given, value) if must_retype else value
    target = np.dtype(codec.B64_TYPES[dtype])
    if given.dtype == target:
        return _tensor(given, value) if must_retype else value
    converted = _exact(given, target)
    if converted is None:
        if from_file:
            hint = f"save the array as {dtype}: np.save(path, a.astype('{dtype}'))"
        elif target.kind == "f":
            hint = f"give values that {dtype} holds exactly"
        else:
            hint = f"give whole numbers that fit {dtype}"
        fail(f"{where} expects {dtype}, but {source} and does not convert exactly to {dtype} "
             f"(expected {dtype}, given {given.dtype.name}); {hint}")
    return _tensor(converted)


def _tensor(array: np.ndarray, source: Any = None) -> dict[str, Any]:
    """A typed b64 tensor with the array's own shape (0-d stays ``[]``)."""
    from mserve.protocol import codec

    try:
        encoded = codec.encode_tensor(array)
    except ValueError as exc:
        fail(f"{source.path if isinstance(source, NpyValue) else 'value'}: {exc}")
    encoded["shape"] = list(array.shape)
    return encoded


def _mixed_numbers(value: Any) -> "np.ndarray | None":
    """A rectangular list of ints and floats (no bools) as a float32 array, else None."""
    import numpy as np

    def numbers_only(v: Any) -> bool:
        if isinstance(v, list):
            return all(numbers_only(x) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not numbers_only(value):
        return None
    try:
        # float32: what a JSON float means on the wire (PROTOCOL.md section 2)
        return np.asarray(value, dtype=np.float64).astype(np.float32)
    except ValueError:  # ragged
        return None


def _is_literal(value: Any) -> bool:
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return True
    if isinstance(value, list):
        return all(_is_literal(v) for v in value)
    return False


def _exact(array: np.ndarray, target: np.dtype) -> np.ndarray | None:
    """``array`` as ``target`` when every value survives the trip, else None."""
    import numpy as np

    if array.dtype.kind == "f" and target.kind in "biu" and not np.all(np.isfinite(array)):
        return None
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            return None
    with np.errstate(all="ignore"):
        converted = array.astype(target)
        back = converted.astype(array.dtype)
    same = np.array_equal(back, array, equal_nan=array.dtype.kind == "f")
    if same and target.kind == "f" and array.dtype.kind == "f":
        same = bool(np.all(np.isfinite(converted) == np.isfinite(array)))
    return converted if same else None


def save_dtype(declared: dict[str, Any] | None, decoded: Any) -> Any:
    """A reply value as an array of the output's declared dtype (JSON numbers come
    back as Python ints/floats, which numpy would store as int64/float64)."""
    import numpy as np

    array = np.asarray(decoded)
    dtype = (declared or {}).get("dtype")
    if dtype and array.dtype.kind in "biuf":
        from mserve.protocol import codec

        if dtype in codec.B64_TYPES:
            return array.astype(codec.B64_TYPES[dtype])
    return array
