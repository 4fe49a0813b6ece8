"""HTTP(S) to a running server for the client commands (`invoke`, `list --url`).

The standard library (``urllib`` + ``ssl``): no extra dependency, the CLI starts
fast, and ``ssl.SSLContext`` covers --cacert, --cert/--key and --insecure directly.
Every way a request can fail becomes one `CliError` line that says what to do.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Optional

from .render import fail

DEFAULT_URL = "http://127.0.0.1:5500"


def check_base(base: str) -> str:
    if "://" not in base:
        fail(f"--url {base!r} needs a scheme: http://HOST:PORT or https://HOST:PORT")
    return base.rstrip("/")


def check_files(**options: Optional[Path]) -> None:
    """Each TLS file given must be a readable file: the error names the option and the file."""
    for option, path in options.items():
        if path is None:
            continue
        if not path.is_file():
            fail(f"--{option} {path}: no such file" if not path.exists() else f"--{option} {path}: not a file")
        try:
            path.open("rb").close()
        except OSError as exc:
            fail(f"--{option} {path}: cannot be read ({exc.strerror or exc})")


def ssl_context(url: str, cacert: Optional[Path], cert: Optional[Path], key: Optional[Path], insecure: bool) -> Any:
    """The TLS context for an https:// URL (None for http://)."""
    if not url.lower().startswith("https://"):
        if cacert or cert or key or insecure:
            fail("--cacert, --cert, --key and --insecure apply to https:// URLs only")
        return None
    if key and not cert:
        fail("--key needs --cert")
    check_files(cacert=cacert, cert=cert, key=key)
    try:
        context = ssl.create_default_context(cafile=str(cacert) if cacert else None)
    except (OSError, ssl.SSLError) as exc:
        fail(f"--cacert {cacert}: not a usable CA bundle (PEM): {exc}")
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        try:
            context.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as exc:
            given = f"--cert {cert}" + (f" --key {key}" if key else "")
            fail(f"{given}: not a usable client certificate and key (PEM; the key inside --cert or given with "
                 f"--key): {exc}")
    context.mserve_has_cert = bool(cert)  # type: ignore[attr-defined]  # for the hint below
    return context


# OpenSSL's words for "the server wanted a client certificate and got none (or one
# it does not accept)": TLS 1.3 reports it as an alert after the handshake.
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "certificate required", "HANDSHAKE_FAILURE", "UNKNOWN_CA",
                       "BAD_CERTIFICATE", "bad certificate", "unknown ca")


def _tls_failure(url: str, exc: BaseException, context: Any) -> str:
    text = str(exc)
    if any(alert in text for alert in _CLIENT_CERT_ALERTS):
        if not getattr(context, "mserve_has_cert", False):
            return (f"TLS error talking to {url}: the server requires a client certificate (mutual TLS); "
                    f"pass --cert client.pem (and --key client.key if the key is a separate file) [{text}]")
        return (f"TLS error talking to {url}: the server refused the client certificate given with --cert "
                f"(is it signed by the CA the server trusts, --ssl-ca?) [{text}]")
    return f"TLS error talking to {url}: {text}"


def _not_http_answer(url: str, exc: Exception) -> str:
    """An answer that is not HTTP/1.1: say which port it looks like, never print its bytes."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url).netloc
    line = exc.args[0] if isinstance(exc, http.client.BadStatusLine) and exc.args else ""
    if isinstance(line, str) and line and not line.isprintable():
        # HTTP/2 frames (a gRPC server's SETTINGS or GOAWAY), not a status line.
        return (f"{url} answered in binary HTTP/2 frames, not HTTP/1.1: that is a gRPC port; use "
                f"--url grpc://{where} (grpcs:// if it serves TLS), or the server's REST port")
    if isinstance(exc, http.client.RemoteDisconnected) and url.lower().startswith("https://"):
        return (f"{url} closed the connection without an HTTP answer: if it is a gRPC port, use "
                f"--url grpcs://{where}")
    return f"no valid HTTP answer from {url}: {type(exc).__name__}"


def request(url: str, body: bytes | None, timeout: float, context: Any) -> tuple[int, bytes]:
    """GET (``body`` None) or POST ``body``; (status, reply bytes) for any HTTP
    answer, a `CliError` otherwise."""
    import http.client
    import socket
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            fail(f"TLS verification of {url} failed: {reason.verify_message or reason} (use --cacert FILE, or --insecure)")
        if isinstance(reason, ssl.SSLError):
            fail(_tls_failure(url, reason, context))
        if isinstance(reason, ConnectionRefusedError):
            fail(f"cannot connect to {url}: connection refused (is `mserve start` running there?)")
        if isinstance(reason, (TimeoutError, socket.timeout)):
            fail(f"no answer from {url} within {timeout:g}s (--timeout)")
        if isinstance(reason, socket.gaierror):
            fail(f"cannot resolve the host of {url}: {reason.strerror or reason}")
        if isinstance(reason, ConnectionResetError) and context is not None:
            fail(_tls_failure(url, reason, context) + " (the server closed the connection: a client certificate?)")
        fail(f"cannot connect to {url}: {getattr(reason, 'strerror', None) or reason}")
    except (TimeoutError, socket.timeout):
        fail(f"no answer from {url} within {timeout:g}s (--timeout)")
    except ssl.SSLError as exc:
        fail(_tls_failure(url, exc, context))
    except http.client.HTTPException as exc:  # not HTTP/1.1 at all
        fail(_not_http_answer(url, exc))
    except (ConnectionError, OSError) as exc:
        fail(f"connection to {url} failed: {exc.strerror or exc}")


def get_json(url: str, timeout: float, context: Any) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON), or (status, None) when the body is not JSON."""
    import orjson

    status, raw = request(url, None, timeout, context)
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, None
