"""The request body that `/docs` ("Try it out") offers for a method: one that works
when sent as it is.

Swagger UI makes its default body from the schema (``0`` for a number), which a
float32 input refuses (``int32 not match float32``) and a Python stage decoding an
image cannot use. So each method's request gets an explicit example:

* the servable's own, when its folder has ``examples/METHOD.json`` (a request body,
  ``{"instances": [...]}``), e.g. a real image for a model that reads PNG bytes;
* otherwise one made from the declared inputs: floats that are not whole numbers
  (a browser writes ``1.0`` as ``1``, which the protocol reads as int32), integers,
  booleans, text, base64 for bytes, in the declared shape (a free dimension as 1).
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)


def request_example(servable_folder: Path | None, method: str, inputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The example body for ``method`` (``inputs``: the described inputs, each with
    ``name``, ``dtype`` and ``shape``, either possibly None)."""
    shipped = _shipped(servable_folder, method)
    if shipped is not None:
        return shipped
    counter = itertools.count()
    return {"instances": [{spec["name"]: _value(spec.get("dtype"), spec.get("shape"), counter) for spec in inputs}]}


def _shipped(servable_folder: Path | None, method: str) -> dict[str, Any] | None:
    if servable_folder is None:
        return None
    path = servable_folder / "examples" / f"{method}.json"
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s is not a JSON request body (%s); /docs makes its own example instead", path, exc)
        return None
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        log.warning("%s is not a request body ({\"instances\": [...]}); /docs makes its own example instead", path)
        return None
    return body


def _value(dtype: str | None, shape: list[int | None] | None, counter: Iterator[int]) -> Any:
    dims = [1 if d is None else d for d in (shape or [])]
    if dtype == "bytes":
        return {"b64": "aGVsbG8=", "type": "bytes"}  # b"hello"
    if dtype == "str":
        return "text"
    return _nested(dims, lambda: _leaf(dtype, next(counter)))


def _nested(dims: list[int], leaf: Any) -> Any:
    if not dims:
        return leaf()
    return [_nested(dims[1:], leaf) for _ in range(dims[0])]


def _leaf(dtype: str | None, n: int) -> Any:
    if dtype is not None and dtype.startswith(("int", "uint")):
        return n + 1
    if dtype == "bool":
        return n % 2 == 0
    return n + 0.5  # float inputs, and inputs a Python stage reads (no declared dtype)
