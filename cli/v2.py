"""The CLI speaking the Open Inference Protocol (KServe v2) over REST: ``--protocol v2``.

`invoke`: ``mserve invoke MODEL --protocol v2 -i NAME=VALUE ...`` asks the model's
metadata (``GET /v2/models/{model}[/versions/{v}]``) for its input datatypes, sends
each input as one tensor (JSON literals shaped as written and cast to the declared
datatype; ``@file.npy`` arrays as they are; other files as BYTES), and shows the
output tensors. ``MODEL`` is an OIP model name (``add.add_common``, ``lenet``, or any
name a Triton or MLServer server serves); ``SERVABLE:METHOD`` is taken as
``SERVABLE.METHOD``.

`list_models`: ``mserve list --url URL --protocol v2`` lists the models of any v2
server from its repository index (``POST /v2/repository/index``) and metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import numpy as np
from rich.table import Table

from . import render
from .client import check_base, get_json, request
from .render import fail
from .schema import NpyValue

# JSON literal -> numpy dtype of the declared datatype.
_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64}
_DATATYPE_OF = {np.dtype(v): k for k, v in _DTYPES.items()}


def model_name(target: str) -> str:
    """``SERVABLE:METHOD`` -> ``SERVABLE.METHOD``; anything else is the model's name."""
    servable, sep, method = target.partition(":")
    return f"{servable}.{method}" if sep else target


def model_path(base: str, model: str, version: Optional[int]) -> str:
    shown = f"/versions/{version}" if version else ""
    return f"{check_base(base)}/v2/models/{quote(model, safe='')}{shown}"


def tensor(name: str, value: Any, declared: Optional[str]) -> dict[str, Any]:
    """One input tensor (JSON form) from an ``-i`` value."""
    if isinstance(value, dict) and "b64" in value:  # a file read as bytes
        import pybase64

        data = pybase64.b64decode(value["b64"])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            fail(f"input {name}: JSON cannot carry binary file contents over --protocol v2; use tritonclient")
        return {"name": name, "shape": [1], "datatype": "BYTES", "data": [text]}
    if isinstance(value, str):
        return {"name": name, "shape": [1], "datatype": "BYTES", "data": [value]}
    array = value.array if isinstance(value, NpyValue) else np.asarray(value)
    if declared in _DTYPES and not isinstance(value, NpyValue):
        array = array.astype(_DTYPES[declared])
    elif array.dtype == np.float64 and not isinstance(value, NpyValue):
        array = array.astype(np.float32)  # as the MindSpore routes read a JSON float
    elif array.dtype == np.int64 and not isinstance(value, NpyValue):
        array = array.astype(np.int32)
    datatype = _DATATYPE_OF.get(array.dtype)
    if datatype is None:
        fail(f"input {name}: dtype {array.dtype} has no Open Inference Protocol datatype")
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}


def invoke(base: str, target: str, inputs: dict[str, Any], version: Optional[int], timeout: float, context: Any,
           as_json: bool, output: Optional[Path]) -> None:
    """Send one infer request and show (or print, or save) its outputs; exit 2 on an error reply."""
    import orjson

    model = model_name(target)
    if not inputs:
        fail("no inputs: give -i NAME=VALUE (repeatable)")
    address = model_path(base, model, version)
    status, metadata = get_json(address, timeout, context)
    declared = {}
    if status == 200 and isinstance(metadata, dict):
        declared = {t.get("name"): t.get("datatype") for t in metadata.get("inputs", []) if isinstance(t, dict)}
    body = {"inputs": [tensor(name, value, declared.get(name)) for name, value in inputs.items()]}
    code, raw = request(address + "/infer", orjson.dumps(body), timeout, context)
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError:
        fail(f"HTTP {code} from {address}/infer, and the body is not JSON: {raw[:120]!r}")
    if as_json:
        print(raw.decode("utf-8", "replace"))
    if code != 200 or not isinstance(reply, dict) or not isinstance(reply.get("outputs"), list):
        message = reply.get("error") if isinstance(reply, dict) else None
        fail(f"HTTP {code}: {message if message is not None else json.dumps(reply)}")
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        for out in reply["outputs"]:
            array = np.asarray(out.get("data"), dtype=_DTYPES.get(out.get("datatype"), object))
            np.save(output / f"{out['name']}.npy", array.reshape(out.get("shape") or array.shape))
        render.note(f"saved {len(reply['outputs'])} file(s) to {output}")
    if not as_json:
        table = Table(title=f"{reply.get('model_name', model)} version {reply.get('model_version', '?')}")
        for column in ("output", "datatype", "shape", "data"):
            table.add_column(column)
        for out in reply["outputs"]:
            data = json.dumps(out.get("data"))
            table.add_row(out.get("name", "?"), out.get("datatype", "?"), json.dumps(out.get("shape")),
                          data if len(data) <= 120 else data[:117] + "...")
        render.out().print(table)


def list_models(base: str, timeout: float, context: Any) -> list[dict[str, Any]]:
    """Every model and version of a v2 server, with its inputs and outputs."""
    base = check_base(base)
    code, raw = request(base + "/v2/repository/index", b"{}", timeout, context)
    try:
        index = json.loads(raw)
    except ValueError:
        index = None
    if code != 200 or not isinstance(index, list):
        fail(f"{base}/v2/repository/index answered HTTP {code} (is this an Open Inference Protocol server?)")
    models = []
    for entry in index:
        if not isinstance(entry, dict) or "name" not in entry:
            continue
        version = str(entry.get("version") or "")
        address = f"{base}/v2/models/{quote(entry['name'], safe='')}" + (f"/versions/{version}" if version else "")
        status, metadata = get_json(address, timeout, context)
        described = metadata if status == 200 and isinstance(metadata, dict) else {}
        models.append({"name": entry["name"], "version": version, "state": entry.get("state", ""),
                       "inputs": described.get("inputs", []), "outputs": described.get("outputs", [])})
    return models


def models_table(models: list[dict[str, Any]], base: str) -> Table:
    table = Table(title=f"{base}: Open Inference Protocol models")
    for column in ("model", "version", "state", "inputs", "outputs"):
        table.add_column(column)

    def shown(tensors: list[Any]) -> str:
        return "\n".join(f"{t.get('name')} {t.get('datatype')} {t.get('shape')}" for t in tensors
                         if isinstance(t, dict))

    for model in models:
        table.add_row(model["name"], model["version"], model["state"], shown(model["inputs"]),
                      shown(model["outputs"]))
    return table
