"""`mserve invoke SERVABLE:METHOD`: build a predict request, send it, show the reply.

Inputs come from ``-i NAME=VALUE`` (a JSON literal, or ``@file``: ``.npy`` -> typed
b64 tensor, ``.json`` -> the JSON value, anything else -> b64 bytes) and/or
``--instances FILE.json``. Tensors and bytes are encoded by ``mserve.protocol.codec``, the
same codec the server decodes with.

Before sending, invoke asks the server for the method's signature (``GET
/model/{name}``) and fits literals and ``.npy`` arrays to the declared dtypes when the
conversion is exact (`cli.schema`); ``--output`` saves outputs in their declared
dtypes. HTTP(S) goes through `cli.client`.

gRPC (``--grpc``, or a ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` or ``unix:PATH``
URL) sends the same inputs through `mserve.client` to MindSpore Serving's
``MSService``: each ``-i`` value is decoded as the REST server decodes it (JSON int
-> int32, float -> float32, typed b64 -> its tensor, b64 bytes -> bytes), and the
reply is shown (and ``--json`` printed) in the REST reply's shape.

Exit codes:
  0  every instance answered;
  1  the reply lists instances and at least one carries ``error_msg``;
  2  no per-instance result: a request-level error (bad URL, unknown servable or
     method, bad JSON, a single top-level ``error_msg`` such as a bad value in a
     one-instance request), no connection, timeout, TLS failure, or a bad command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from . import render
from .client import DEFAULT_URL, check_base, check_files, get_json, request, ssl_context
from .render import CliError, fail
from .schema import NpyValue, conform_instances, find_method, save_dtype

EPILOG = """\
[bold]Examples[/]

  mserve invoke add:add_common -i x1='[[1.0,2.0],[3.0,4.0]]' -i x2='[[5.0,6.0],[7.0,8.0]]'
  [dim]# typed tensors from .npy files[/]
  mserve invoke add:add_common -i x1=@sample_data/add_x1.npy \\
      -i x2=@sample_data/add_x2.npy
  [dim]# prepared instances, raw JSON reply[/]
  mserve invoke add:add_common --instances sample_data/add_instances.json --json
  [dim]# 4 copies of the instance, version 1, outputs saved as .npy[/]
  mserve invoke add:add_cast -i x1='[[1,2],[3,4]]' -i x2='[[1,1],[1,1]]' \\
      -n 4 --version 1 --output out/
  [dim]# HTTPS with a private CA[/]
  mserve invoke demo:predict -i x='[1.0,2.0,3.0,4.0]' --url https://host:5500 --cacert ca.pem
  [dim]# mutual TLS: a client certificate too[/]
  mserve invoke add:add_common -i x1='[[1.0,2.0],[3.0,4.0]]' -i x2='[[1.0,2.0],[3.0,4.0]]' \\
      --url https://host:5500 --cacert ca.pem --cert client.pem --key client.key
  [dim]# the Open Inference Protocol (KServe v2): a model name, on mserve or any v2 server[/]
  mserve invoke add.add_common --protocol v2 -i x1='[[1.0,2.0],[3.0,4.0]]' -i x2='[[1.0,2.0],[3.0,4.0]]'
  [dim]# over gRPC (mserve start --grpc-port 5501); grpcs:// for TLS[/]
  mserve invoke add:add_common -i x1='[[1.0,2.0],[3.0,4.0]]' -i x2='[[5.0,6.0],[7.0,8.0]]' \\
      --url grpc://127.0.0.1:5501

VALUE is a JSON literal (quote it for the shell; a string needs JSON quotes: -i text='"hi"') or @FILE: .npy -> typed tensor, .json -> its JSON value, any other file -> bytes. invoke reads the method's input dtypes from the server and converts literals and .npy data to them when the conversion is exact (1 -> 1.0 for a float32 input); otherwise it stops and names the input, the expected and the given dtype.

[bold]Exit codes[/]: 0 every instance answered; 1 some instance failed (error_msg in its place); 2 no per-instance result: request-level error (unknown servable or method, bad URL or JSON, a top-level error_msg), no connection, timeout, or a bad command line.
"""

# Tensors with more elements than this are summarized (dtype, shape, min/max/mean).
_SHOW_LIMIT = 64


# --------------------------------------------------------------------------- request


def parse_target(target: str) -> tuple[str, str]:
    servable, sep, method = target.partition(":")
    if not sep or not servable or not method or "/" in servable:
        fail(f"expected SERVABLE:METHOD (e.g. add:add_common), got {target!r}")
    return servable, method


def read_value(text: str) -> Any:
    """One ``-i`` VALUE: a JSON literal, or ``@file``."""
    if text.startswith("@"):
        return read_file_value(Path(text[1:]).expanduser())
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(
            f"value {text!r} is not a JSON literal ({exc.msg}); quote strings as JSON (-i name='\"text\"') "
            "or pass a file with @FILE"
        )


def read_file_value(path: Path) -> Any:
    """``@file``: .npy -> its array (typed once the signature is known), .json -> JSON
    value, else b64 bytes."""
    from mserve.protocol import codec

    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            import numpy as np

            try:
                return NpyValue(np.load(path, allow_pickle=False), path)
            except ValueError as exc:
                fail(f"{path} is not a plain .npy array: {exc}")
        if suffix == ".json":
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                fail(f"{path} is not valid JSON: {exc}")
        return codec.encode_bytes(path.read_bytes())
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def parse_inputs(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            fail(f"-i expects NAME=VALUE, got {item!r}")
        if name in values:
            fail(f"input {name!r} is given twice")
        values[name] = read_value(text)
    return values


def read_instances(source: str) -> list[Any]:
    """An instance list from a JSON file (or ``-`` for stdin): a list of instances,
    one instance object, or a whole request body ``{"instances": ...}``."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).expanduser().read_text()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror or exc}")
    where = "stdin" if source == "-" else source
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{where} is not valid JSON: {exc}")
    if isinstance(data, dict) and "instances" in data:
        data = data["instances"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
        fail(f"{where}: expected a list of instance objects, one instance object, or {{\"instances\": [...]}}")
    return data


def build_body(inputs: dict[str, Any], instances_file: Optional[str], count: int) -> dict[str, Any]:
    """The request body: file instances (each completed with ``-i`` inputs) or one
    instance from ``-i``, repeated ``count`` times."""
    if count < 1:
        fail(f"--count must be at least 1, got {count}")
    if instances_file is not None:
        instances = [{**inst, **inputs} for inst in read_instances(instances_file)]
        if not instances:
            fail(f"{instances_file} holds no instances")
    elif inputs:
        instances = [inputs]
    else:
        fail("no inputs: give -i NAME=VALUE (repeatable) or --instances FILE.json")
    return {"instances": instances * count}


def predict_url(base: str, servable: str, method: str, version: Optional[int]) -> str:
    from urllib.parse import quote

    path = render.predict_path(quote(servable, safe=""), quote(method, safe=""), version)
    return check_base(base) + path


def method_signature(
    base: str, servable: str, method: str, version: Optional[int], timeout: float, context: Any
) -> Optional[dict[str, Any]]:
    """The method's inputs and outputs as the server describes them, or None when the
    server does not say: not an mserve server (MindSpore Serving has no such GET
    endpoint), or no such servable, version or method (the predict then answers
    404 in MindSpore's words, with what is served)."""
    from urllib.parse import quote

    url = f"{check_base(base)}/model/{quote(servable, safe='')}"
    try:
        status, described = get_json(url, timeout, context)
    except CliError:  # no connection, TLS: the predict reports it, naming its own URL
        return None
    if status != 200 or not isinstance(described, dict):
        return None
    return find_method(described, version, method)


# --------------------------------------------------------------------------- gRPC


def is_grpc_url(url: str) -> bool:
    return url.lower().startswith(("grpc://", "grpcs://", "unix:"))


def grpc_address(url: str, cacert: Optional[Path], cert: Optional[Path]) -> tuple[str, bool]:
    """(what the gRPC client dials, whether over TLS) for --url with --grpc."""
    scheme, sep, rest = url.partition("://")
    if url.lower().startswith("unix:"):
        return url, bool(cacert or cert)
    if not sep:
        scheme, rest = "grpc", url
    if scheme.lower() not in ("grpc", "grpcs", "http", "https"):
        fail(f"--url {url!r}: for gRPC give grpc://HOST:PORT, grpcs://HOST:PORT (TLS) or unix:PATH")
    address = rest.rstrip("/")
    if not address or "/" in address:
        fail(f"--url {url!r}: a gRPC address is HOST:PORT, without a path")
    return address, scheme.lower() in ("grpcs", "https") or bool(cacert or cert)


def _grpc_scheme_hint(text: str, address: str, tls: bool) -> str:
    """What the failure of a gRPC call says about the port: which --url fits it."""
    if "http1.x server" in text or "Expected SETTINGS frame" in text:
        scheme = "https" if tls else "http"
        return (f"\nhint: {address} answers HTTP/1.1, a REST port: use --url {scheme}://{address} (without --grpc), "
                f"or the server's --grpc-port")
    if not tls and "Socket closed" in text:
        return (f"\nhint: if {address} serves TLS (mserve start --ssl-certfile), use --url grpcs://{address} "
                f"--cacert CA.pem")
    if tls and "WRONG_VERSION_NUMBER" in text:
        return f"\nhint: {address} does not speak TLS: use --url grpc://{address}"
    return ""


def grpc_value(name: str, value: Any) -> Any:
    """One JSON input as the gRPC client sends it, decoded as the REST server would."""
    from mserve.errors import BadRequest
    from mserve.protocol import codec

    if isinstance(value, dict) and "b64" in value and value.get("type", "bytes") == "bytes":
        import pybase64

        try:
            return pybase64.b64decode(value["b64"], validate=True)
        except (TypeError, ValueError):
            fail(f"input {name}: the 'b64' value is illegal b64 encode string")
    try:
        return codec.decode_value(value)
    except BadRequest as exc:
        fail(f"input {name}: {exc.message}")


def call_grpc(
    url: str, servable: str, method: str, version: Optional[int], instances: list[dict[str, Any]],
    cacert: Optional[Path], cert: Optional[Path], key: Optional[Path], insecure: bool, timeout: float,
) -> dict[str, Any]:
    """Send ``instances`` over gRPC; the reply in the REST reply's shape."""
    from mserve.client import Client, SSLConfig
    from mserve.protocol import codec

    if insecure:
        fail("--insecure is not available over gRPC (grpcio always verifies the server); give --cacert CA.pem")
    if key and not cert:
        fail("--key needs --cert")
    check_files(cacert=cacert, cert=cert, key=key)
    address, tls = grpc_address(url, cacert, cert)
    ssl_config = None
    if tls:
        ssl_config = SSLConfig(
            certificate=str(cert) if cert else None,
            private_key=str(key or cert) if cert else None,  # a PEM holding both, as curl --cert
            custom_ca=str(cacert) if cacert else None,
        )
    values = [{name: grpc_value(name, v) for name, v in inst.items()} for inst in instances]
    import logging

    logging.getLogger("mserve.client").setLevel(logging.ERROR)  # a failed call is reported below, once
    try:
        client = Client(address, servable, method, version or 0, ssl_config=ssl_config, timeout=timeout)
    except (OSError, RuntimeError) as exc:
        fail(f"gRPC client setup failed: {getattr(exc, 'strerror', None) or exc}")
    try:
        result = client.infer(values)
    finally:
        client.close()
    if isinstance(result, dict):
        text = str(result.get("error"))
        if text.startswith("Grpc Error, "):
            fail(f"gRPC call to {address} failed: {text}{_grpc_scheme_hint(text, address, tls)}")
        return {"error_msg": text}
    shaped = []
    for item in result:
        if list(item) == ["error"] and isinstance(item["error"], str):
            shaped.append({"error_msg": item["error"]})
        else:
            shaped.append({name: codec.encode_value(v) for name, v in sorted(item.items())})
    return {"instances": shaped}


# --------------------------------------------------------------------------- reply


def show_value(value: Any) -> str:
    """A reply value for the table: small values as JSON, big tensors summarized."""
    from mserve.protocol import codec

    decoded = codec.decode_reply_value(value)
    if isinstance(decoded, bytes):
        return f"<{len(decoded)} bytes>"
    import numpy as np

    if isinstance(decoded, np.ndarray) and decoded.dtype.kind in "biuf" and decoded.size > _SHOW_LIMIT:
        kind = {"b": "bool", "i": "int", "u": "int", "f": "float"}[decoded.dtype.kind]
        summary = f"{kind} tensor, shape {list(decoded.shape)}"
        if decoded.dtype.kind in "iuf":
            summary += f", min {decoded.min():.6g}, max {decoded.max():.6g}, mean {decoded.mean():.6g}"
        return summary
    return json.dumps(value, ensure_ascii=False)


def reply_table(instances: list[Any]) -> Table:
    table = Table(show_lines=False)
    table.add_column("instance", justify="right")
    table.add_column("output", style="cyan")
    table.add_column("value", overflow="fold")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            table.add_row(str(index), "", escape(json.dumps(instance)))
        elif "error_msg" in instance:
            table.add_row(str(index), "[red]error_msg[/]", f"[red]{escape(str(instance['error_msg']))}[/]")
        else:
            # By name: gRPC's reply is a protobuf map, whose order is not the method's, so
            # sorting is what makes a reply read the same over REST and gRPC.
            for name, value in sorted(instance.items()):
                table.add_row(str(index), escape(name), escape(show_value(value)))
    return table


def save_outputs(
    instances: list[Any], directory: Path, outputs: Optional[dict[str, dict[str, Any]]] = None
) -> list[Path]:
    """Every output of every answered instance as ``NAME_INDEX.npy`` (``.bin`` for
    bytes, ``.txt`` for strings) in ``directory``; arrays in the output's declared
    dtype (``outputs``: name -> description) where the server declares one."""
    import numpy as np

    from mserve.protocol import codec

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {directory}: {exc.strerror or exc}")
    written = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict) or "error_msg" in instance:
            continue
        for name, value in instance.items():
            decoded = codec.decode_reply_value(value)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            if isinstance(decoded, bytes):
                path = directory / f"{safe}_{index}.bin"
                path.write_bytes(decoded)
            elif isinstance(decoded, str):
                path = directory / f"{safe}_{index}.txt"
                path.write_text(decoded)
            else:
                path = directory / f"{safe}_{index}.npy"
                np.save(path, save_dtype((outputs or {}).get(name), decoded), allow_pickle=False)
            written.append(path)
    return written


def invoke(
    target: str = typer.Argument(..., metavar="SERVABLE:METHOD", help="What to call, e.g. add:add_common."),
    inputs: Optional[list[str]] = typer.Option(
        None, "--input", "-i", metavar="NAME=VALUE", help="An input: JSON literal or @FILE (repeatable)."
    ),
    instances: Optional[str] = typer.Option(
        None, "--instances", metavar="FILE.json",
        help="Instances from a JSON file ('-' = stdin): a list, one object, or a full request body. "
        "-i inputs are added to each.",
    ),
    count: int = typer.Option(1, "--count", "-n", min=1, help="Send the instance(s) this many times."),
    version: Optional[int] = typer.Option(None, "--version", "-V", min=0, help="Servable version (default: newest)."),
    url: str = typer.Option(
        DEFAULT_URL, "--url", envvar="MSERVE_URL",
        help="Server base URL; grpc://HOST:PORT, grpcs://HOST:PORT or unix:PATH for gRPC.",
    ),
    use_grpc: bool = typer.Option(
        False, "--grpc", help="Call MindSpore Serving's gRPC service at --url's HOST:PORT instead of REST."
    ),
    cacert: Optional[Path] = typer.Option(None, help="CA bundle (PEM) to verify an https server.", show_default=False),
    cert: Optional[Path] = typer.Option(None, help="Client certificate (PEM) for mutual TLS.", show_default=False),
    key: Optional[Path] = typer.Option(None, help="Private key of --cert, if not inside it.", show_default=False),
    insecure: bool = typer.Option(False, "--insecure", "-k", help="Do not verify the server's certificate."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON reply (for scripts)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", metavar="DIR", help="Save outputs as DIR/NAME_INDEX.npy (.bin for bytes)."
    ),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the reply."),
    protocol: str = typer.Option(
        "mindspore", "--protocol", metavar="mindspore|v2",
        help="v2: the Open Inference Protocol (KServe v2) over REST; the target is then a model name "
        "(add.add_common; SERVABLE:METHOD also works) on any v2 server.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Call a method of a running server and show the reply.

    Builds the request JSON for you: tensors from .npy files are sent as typed base64, other files as bytes. Shows a table of each instance's outputs; big tensors are summarized (use --json or --output DIR for the full values).
    """
    with render.reported(debug, unexpected_code=2):
        if protocol not in ("mindspore", "v2"):
            fail(f"--protocol {protocol!r}: give mindspore (the default) or v2")
        if protocol == "v2":
            _invoke_v2(target, inputs, instances, count, version, url, use_grpc, cacert, cert, key, insecure, as_json,
                       output, timeout)
            return
        servable, method = parse_target(target)
        body = build_body(parse_inputs(inputs or []), instances, count)
        import orjson

        signature = None
        if use_grpc or is_grpc_url(url):
            # MSService has no call describing a method: values go as written (typed .npy
            # arrays keep their dtype; JSON integers are int32 and floats float32).
            body["instances"] = conform_instances(body["instances"], None)
            reply = call_grpc(url, servable, method, version, body["instances"], cacert, cert, key, insecure, timeout)
            raw, status = orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY), "gRPC"
            reply = orjson.loads(raw)  # plain JSON values, as a REST reply would be
        else:
            address = predict_url(url, servable, method, version)
            context = ssl_context(address, cacert, cert, key, insecure)
            signature = method_signature(url, servable, method, version, timeout, context)
            body["instances"] = conform_instances(body["instances"], signature)
            code, raw = request(address, orjson.dumps(body), timeout, context)
            status = f"HTTP {code}"
            try:
                reply = orjson.loads(raw)
            except orjson.JSONDecodeError:
                snippet = " ".join(raw[:300].decode("utf-8", "replace").split())[:120]
                fail(f"{status} from {address}, and the body is not JSON (is this an mserve server?): {snippet}")

        if as_json:
            sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\n") + "\n")
        answered = isinstance(reply, dict) and isinstance(reply.get("instances"), list)
        if answered and output is not None:
            declared = {o["name"]: o for o in (signature or {}).get("outputs", [])}
            written = save_outputs(reply["instances"], output, declared)
            render.note(f"saved {len(written)} file(s) to {escape(str(output))}")
        if not answered:
            message = reply.get("error_msg") if isinstance(reply, dict) else None
            fail(f"{status}: {message if message is not None else json.dumps(reply)}")
        if not as_json:
            render.out().print(reply_table(reply["instances"]))
        failed = sum(1 for i in reply["instances"] if not isinstance(i, dict) or "error_msg" in i)
        if failed:
            render.error_line(f"{failed} of {len(reply['instances'])} instance(s) failed")
            raise typer.Exit(1)


def _invoke_v2(target: str, inputs: Optional[list[str]], instances: Optional[str], count: int, version: Optional[int],
               url: str, use_grpc: bool, cacert: Optional[Path], cert: Optional[Path], key: Optional[Path],
               insecure: bool, as_json: bool, output: Optional[Path], timeout: float) -> None:
    """``--protocol v2``: one infer request over REST (`cli.v2`)."""
    from . import v2

    if use_grpc or is_grpc_url(url):
        fail("--protocol v2 speaks REST: give the http(s):// URL (for v2 over gRPC, use tritonclient.grpc)")
    if instances is not None or count != 1:
        fail("--protocol v2 sends one set of input tensors: use -i NAME=VALUE, not --instances or --count")
    address = v2.model_path(url, v2.model_name(target), version)
    v2.invoke(url, target, parse_inputs(inputs or []), version, timeout,
              ssl_context(address, cacert, cert, key, insecure), as_json, output)
