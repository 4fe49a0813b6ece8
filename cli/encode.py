"""`mserve encode FILE...`: files as request JSON, printed compactly to stdout.

* ``.npy`` -> ``{"b64": ..., "type": "float32", "shape": [2, 2]}`` (typed tensor);
* any other file (image, binary) -> ``{"b64": ..., "type": "bytes"}``, or, with
  ``--type`` (a numeric type) and ``--shape``, its raw little-endian bytes as a
  tensor of that type and shape;
* ``--name INPUT`` wraps it as an instance ``{"INPUT": {...}}`` (one ``--name`` per
  file, in order, to build an instance with several inputs); ``--instances`` wraps
  that as a request body ``{"instances": [{...}]}``.

The objects are made by ``mserve.protocol.codec`` (the server's own wire codec).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from . import render
from .render import fail

EPILOG = """\
[bold]Examples[/]

  [dim]# {"b64": "...", "type": "bytes"}[/]
  mserve encode image.png
  [dim]# {"b64": "...", "type": "float32", "shape": [2, 2]}[/]
  mserve encode sample_data/add_x1.npy
  [dim]# a raw file read as a uint8 tensor[/]
  mserve encode raw.bin --type uint8 --shape 28,28
  [dim]# a whole request body, straight into curl[/]
  mserve encode sample_data/add_x1.npy sample_data/add_x2.npy \\
      --name x1 --name x2 --instances \\
      | curl -sd @- http://127.0.0.1:5500/model/add:add_common
"""


def parse_shape(text: str) -> list[int]:
    """``2,2`` / ``2x2`` / ``[2, 2]``; empty (``""`` or ``[]``) is a scalar."""
    cleaned = text.strip().strip("[]()").replace("x", ",").replace(" ", "")
    if not cleaned:
        return []
    try:
        dims = [int(d) for d in cleaned.split(",") if d != ""]
    except ValueError:
        fail(f"--shape {text!r}: expected numbers such as 2,2")
    if any(d < 0 for d in dims):
        fail(f"--shape {text!r}: dimensions must be non-negative")
    return dims


def encode_file(path: Path, type_name: Optional[str], shape: Optional[list[int]]) -> dict[str, Any]:
    import numpy as np

    from mserve.protocol import codec

    try:
        if path.suffix.lower() == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except ValueError as exc:
                fail(f"{path} is not a plain .npy array: {exc}")
            if type_name is not None:
                array = array.astype(_numeric_dtype(type_name))
            if shape is not None:
                if int(np.prod(shape)) != array.size:
                    fail(f"--shape {shape} does not fit {path}: it holds {array.size} values (shape {list(array.shape)})")
                array = array.reshape(shape)
            try:
                return codec.encode_tensor(array)
            except ValueError as exc:
                fail(f"{path}: {exc}")
        data = path.read_bytes()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")

    if type_name is None or type_name == "bytes":
        if shape not in (None, [], [1]):
            fail("--shape applies to tensors; bytes are one item (give --type for a tensor)")
        return codec.encode_bytes(data)
    if type_name == "str":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            fail(f"{path} is not UTF-8 text, so it cannot be sent as type str")
        obj = codec.encode_bytes(data)
        obj["type"] = "str"
        return obj
    dtype = np.dtype(_numeric_dtype(type_name)).newbyteorder("<")
    if len(data) % dtype.itemsize:
        fail(f"{path} has {len(data)} bytes, not a whole number of {type_name} values ({dtype.itemsize} bytes each)")
    array = np.frombuffer(data, dtype=dtype)
    if shape is not None:
        if int(np.prod(shape)) != array.size:
            fail(f"--shape {shape} needs {int(np.prod(shape))} {type_name} values, {path} holds {array.size}")
        array = array.reshape(shape)
    return codec.encode_tensor(array.astype(dtype.newbyteorder("=")))


def _numeric_dtype(type_name: str) -> Any:
    from mserve.protocol import codec

    target = codec.B64_TYPES.get(type_name)
    if target is None or target in (str, bytes):
        numeric = [t for t, v in codec.B64_TYPES.items() if v not in (str, bytes)]
        fail(f"--type {type_name!r} is not a tensor type; use one of: {', '.join(numeric)}, str, bytes")
    return target


def encode(
    files: list[Path] = typer.Argument(..., metavar="FILE...", help="Files to encode (.npy, image, binary)."),
    type_name: Optional[str] = typer.Option(
        None, "--type", "-t", metavar="T",
        help="Wire type: for .npy a cast; for other files read the raw bytes as this type "
        "(int8..uint64, float16/32/64, bool, str, bytes).",
    ),
    shape: Optional[str] = typer.Option(None, "--shape", metavar="D0,D1,...", help="Tensor shape, e.g. 2,2."),
    names: Optional[list[str]] = typer.Option(
        None, "--name", metavar="INPUT", help="Wrap as an instance {INPUT: ...}; one per file, in order."
    ),
    as_instances: bool = typer.Option(False, "--instances", help='Wrap as a request body {"instances": [...]}.'),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Encode files as request JSON (compact, to stdout), ready for curl -d @-.

    .npy files become typed base64 tensors (type and shape included); other files (images, binaries) base64 bytes. Several files without --name print a JSON list.
    """
    import orjson

    with render.reported(debug, unexpected_code=2):
        names = names or []
        dims = parse_shape(shape) if shape is not None else None
        if type_name is not None:
            _type_ok(type_name)
        encoded = [encode_file(Path(f).expanduser(), type_name, dims) for f in files]
        if names:
            if len(names) != len(files):
                fail(f"give one --name per file: {len(files)} file(s), {len(names)} name(s)")
            if len(set(names)) != len(names):
                fail("the --name values must differ")
            result: Any = dict(zip(names, encoded))
        elif as_instances:
            fail("--instances needs --name INPUT (the method's input name) for each file")
        elif len(files) > 1:
            result = encoded  # a JSON list, one object per file
        else:
            result = encoded[0]
        if as_instances:
            result = {"instances": [result]}
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.flush()


def _type_ok(type_name: str) -> None:
    from mserve.protocol import codec

    if type_name not in codec.B64_TYPES:
        fail(f"--type {type_name!r} is unknown; use one of: {', '.join(codec.B64_TYPES)}")
