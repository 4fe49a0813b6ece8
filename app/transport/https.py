"""HTTPS: the RESTful server over TLS, one-way or mutual (``SSLConfig``).

Waitress has no TLS, so the HTTPS path is served by cheroot (CherryPy's threaded WSGI
server) with the standard library's `ssl` module. Used as shipped, cheroot performs
the TLS handshake inside its accept loop, so one client that connects and never
sends a ClientHello blocks every new connection until the socket timeout (cheroot
issue #748). Here the handshake is moved off that loop:

* `_Adapter.wrap` only wraps the accepted socket (``do_handshake_on_connect=False``);
  it never reads from it.
* A new connection first waits in cheroot's selector, like an idle keep-alive one,
  until the client has sent something (its ClientHello). Idle clients cost no
  thread and are closed after ``idle_timeout``.
* A worker thread then runs the handshake (blocking, bounded by ``io_timeout``), and
  serves the connection's requests. A failed handshake (no client certificate, one
  from another CA, a client that does not trust us, plain HTTP) closes the
  connection before any request is read; plain HTTP gets a plain-text ``400`` with
  a JSON ``{"error_msg"}`` body, like nginx's answer.

Behaviour matches the HTTP path (`mserve.transport.http.WaitressTransport`): the server's
own refusals are JSON ``{"error_msg"}``, a body over the limit is refused from its
Content-Length before it is read (413, ``http message is bigger than {limit}``),
in-flight requests are counted and drained on `TlsTransport.stop`.

This leans on cheroot's extension points (``ssl_adapter``, ``ConnectionClass``,
``RequestHandlerClass``, ``bind``/``prepare``/``process_conn``/``simple_response``)
and on its makefile classes; the dependency is pinned below the next major version,
and tests/test_tls.py covers each of these behaviours.
"""

from __future__ import annotations

import _pyio
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from cheroot import errors as cheroot_errors
from cheroot import wsgi
from cheroot.makefile import StreamReader, StreamWriter
from cheroot.server import ChunkedRFile, HTTPConnection, HTTPRequest
from cheroot.ssl import Adapter

from ..protocol.codec import dumps
from ..errors import PayloadTooLarge
from .http import InFlight

log = logging.getLogger("mserve.transport.https")

_PLAIN_HTTP_MESSAGE = "this port speaks HTTPS only: the client sent plain HTTP, use https://"
# A worker stays with a keep-alive connection while its next request comes within
# _STAY seconds (a client sending back to back), up to _MAX_STAY_REQUESTS in a row.
_STAY = 0.002
_MAX_STAY_REQUESTS = 100


# --------------------------------------------------------------------------- context


def _check_file(label: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise RuntimeError(f"load {label} from {path!r} failed: expected the path of a PEM file")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RuntimeError(f"load {label} from {path} failed: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(1)
    except OSError as exc:
        raise RuntimeError(f"load {label} from {path} failed: {exc.strerror or exc}") from None
    if not head:
        raise RuntimeError(f"load {label} from {path} failed: the file is empty")
    return path


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise _EncryptedKey


def _reason(exc: ssl.SSLError) -> str:
    return getattr(exc, "reason", None) or str(exc)


def _load_certificates(context: ssl.SSLContext, label: str, path: str) -> None:
    """Trust the PEM certificates in ``path``; a clear RuntimeError if there are none."""
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise RuntimeError(f"load {label} from {path} failed: not a PEM certificate ({_reason(exc)})") from None


def build_ssl_context(ssl_config: Any) -> ssl.SSLContext:
    """The server-side `ssl.SSLContext` for ``ssl_config`` (an `mserve.server.SSLConfig`).

    Python's secure defaults (``ssl.create_default_context(Purpose.CLIENT_AUTH)``),
    TLS 1.2 or newer, no renegotiation. ``verify_client=True`` requires a client
    certificate signed by ``custom_ca`` (``CERT_REQUIRED``); with ``verify_client``
    False, ``custom_ca`` is ignored, as in MindSpore Serving.

    Raises `RuntimeError` with MindSpore Serving's wording (``load private_key from
    {file} failed``) for missing, unreadable or invalid files, a key that does not
    match the certificate, or ``verify_client`` without ``custom_ca``.
    """
    verify_client = bool(getattr(ssl_config, "verify_client", False))
    custom_ca = getattr(ssl_config, "custom_ca", None)
    if verify_client and not custom_ca:
        raise RuntimeError(
            "SSLConfig: custom_ca must be given when verify_client is True "
            "(mutual authentication checks client certificates against it)"
        )
    certificate = _check_file("certificate", getattr(ssl_config, "certificate", None))
    private_key = _check_file("private_key", getattr(ssl_config, "private_key", None))
    ca_file = _check_file("custom_ca", custom_ca) if verify_client else None

    # The certificate alone first, so that a bad certificate and a bad key get
    # different messages (load_cert_chain reports both as "PEM lib").
    _load_certificates(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "certificate", certificate)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = max(context.minimum_version, ssl.TLSVersion.TLSv1_2)
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.set_alpn_protocols(["http/1.1"])
    except NotImplementedError:  # pragma: no cover - OpenSSL without ALPN
        pass
    try:
        context.load_cert_chain(certfile=certificate, keyfile=private_key, password=_no_passphrase)
    except _EncryptedKey:
        raise RuntimeError(
            f"load private_key from {private_key} failed: the key is encrypted with a passphrase; "
            "give an unencrypted PEM key"
        ) from None
    except ssl.SSLError as exc:
        reason = _reason(exc)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            reason = f"the private key does not match the certificate {certificate}"
        raise RuntimeError(f"load private_key from {private_key} failed: {reason}") from None
    if verify_client:
        _load_certificates(context, "custom_ca", ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


# ------------------------------------------------------------------------- cheroot glue


class _TlsIO(socket.SocketIO):
    """Raw socket I/O that reports a broken TLS session as cheroot's `FatalSSLAlert`
    (cheroot then closes the connection quietly, as it does for a reset)."""

    def readinto(self, b: Any) -> int | None:
        try:
            return super().readinto(b)
        except ssl.SSLError as exc:
            raise cheroot_errors.FatalSSLAlert(str(exc)) from exc

    def write(self, b: Any) -> int | None:
        try:
            return super().write(b)
        except ssl.SSLError as exc:
            raise cheroot_errors.FatalSSLAlert(str(exc)) from exc


class _Reader(StreamReader):
    def __init__(self, sock: ssl.SSLSocket, mode: str = "rb", bufsize: int = _pyio.DEFAULT_BUFFER_SIZE):
        _pyio.BufferedReader.__init__(self, _TlsIO(sock, mode), bufsize)
        self.bytes_read = 0
        self._tls = sock

    def has_data(self) -> bool:
        """Buffered bytes here or decrypted ones inside OpenSSL: the selector would
        not wake up for the latter, so the connection must go straight to a worker."""
        if super().has_data():
            return True
        try:
            return self._tls.pending() > 0
        except (OSError, ValueError):
            return False


class _Writer(StreamWriter):
    def __init__(self, sock: ssl.SSLSocket, mode: str = "wb", bufsize: int = _pyio.DEFAULT_BUFFER_SIZE):
        _pyio.BufferedWriter.__init__(self, _TlsIO(sock, mode), bufsize)
        self.bytes_written = 0


class _Adapter(Adapter):
    """cheroot's SSL adapter interface, wrapping without handshaking (see module doc)."""

    def __init__(self, context: ssl.SSLContext):  # the base wants files; we have a context
        self.certificate = self.private_key = self.certificate_chain = None
        self.ciphers = self.private_key_password = None
        self.context = context
        self.verify_client = context.verify_mode == ssl.CERT_REQUIRED

    def bind(self, sock: socket.socket) -> socket.socket:
        return sock

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, Any]]:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            wrapped = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:  # the client is already gone
            sock.close()
            raise cheroot_errors.FatalSSLAlert(str(exc)) from exc
        return wrapped, {}

    def get_environ(self, sock: ssl.SSLSocket) -> dict[str, Any]:  # type: ignore[override]
        """WSGI environ entries for a connection whose handshake is done."""
        cipher = sock.cipher() or ("", "", 0)
        env: dict[str, Any] = {"HTTPS": "on", "SSL_PROTOCOL": sock.version() or "", "SSL_CIPHER": cipher[0]}
        env["SSL_CLIENT_VERIFY"] = "NONE"
        if self.verify_client:
            cert = sock.getpeercert() or {}
            if cert:
                env["SSL_CLIENT_VERIFY"] = "SUCCESS"
                subject = dict(item for rdn in cert.get("subject", ()) for item in rdn)
                if "commonName" in subject:
                    env["SSL_CLIENT_S_DN_CN"] = subject["commonName"]
        return env

    def makefile(self, sock: ssl.SSLSocket, mode: str = "r", bufsize: int = _pyio.DEFAULT_BUFFER_SIZE) -> Any:
        return _Reader(sock, mode, bufsize) if "r" in mode else _Writer(sock, mode, bufsize)


class _Request(HTTPRequest):
    """cheroot's request, with the server's own refusals answered in JSON."""

    def simple_response(self, status: Any, msg: Any = "") -> None:
        status = str(status)
        code, _, reason = status.partition(" ")
        if code == "413":
            message = f"http message is bigger than {self.server.max_request_body_size}"
        else:
            text = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg or "")
            message = f"{reason}: {text}" if text else reason
        body = dumps({"error_msg": message})
        head = [
            f"{self.server.protocol} {status}\r\n",
            f"Content-Length: {len(body)}\r\n",
            "Content-Type: application/json\r\n",
        ]
        if code in ("413", "414"):
            self.close_connection = True
            if self.response_protocol == "HTTP/1.1":
                head.append("Connection: close\r\n")
            else:  # HTTP/1.0 has no 413/414 (cheroot does the same)
                head[0] = f"{self.server.protocol} 400 Bad Request\r\n"
        head.append("\r\n")
        try:
            self.conn.wfile.write("".join(head).encode("latin-1") + body)
        except OSError as exc:
            if exc.args[0] not in cheroot_errors.socket_errors_to_ignore:
                raise


class _Connection(HTTPConnection):
    """A TLS connection: waits for the client's first bytes in the selector, then
    handshakes in the worker thread that serves its first request."""

    RequestHandlerClass = _Request

    def __init__(self, server: Any, sock: ssl.SSLSocket, makefile: Any):
        super().__init__(server, sock, makefile)
        self.fresh = True  # not yet seen readable: wait in the selector first
        self.handshaken = False
        sock.settimeout(server.io_timeout)

    def communicate(self) -> bool:
        """Serve the connection's next request, and the ones after it while they come
        within `_STAY` seconds and no other connection waits for a worker: handing an
        active keep-alive connection back to cheroot's selector after each request
        costs two thread wake-ups per request."""
        if not self.handshaken and not self._handshake():
            return False
        keep = super().communicate()
        served = 1
        while keep and served < _MAX_STAY_REQUESTS and self._next_request_soon():
            keep = super().communicate()
            served += 1
        return keep

    def _next_request_soon(self) -> bool:
        if not self.server.ready or self.server.requests.qsize:
            return False
        if self.rfile.has_data():
            return True
        try:
            readable, _, _ = select.select([self.socket], [], [], _STAY)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return bool(readable)

    def _handshake(self) -> bool:
        sock = self.socket
        peer = f"{self.remote_addr}:{self.remote_port}"
        handshaking = self.server.handshaking
        handshaking.add(self)
        try:
            sock.do_handshake()
        except ssl.SSLError as exc:
            reason = _reason(exc)
            if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST") or "http request" in str(exc).lower():
                log.info("client %s sent plain HTTP to the HTTPS port", peer)
                self._answer_plain_http()
            else:
                log.info("TLS handshake with %s failed: %s", peer, reason)
                # OpenSSL has sent its alert; a TLS 1.3 client may already have sent
                # its request too. Close gently so it reads the alert, not a reset.
                self._linger()
            self.server.handshake_failures += 1
            return False
        except (OSError, ValueError) as exc:  # timeout, reset, closed
            log.debug("TLS handshake with %s failed: %r", peer, exc)
            self.server.handshake_failures += 1
            return False
        finally:
            handshaking.discard(self)
        self.handshaken = True
        self.ssl_env = self.server.ssl_adapter.get_environ(sock)
        return True

    def _answer_plain_http(self) -> None:
        """Answer in plain text (nothing was encrypted yet), then close gently so the
        client reads the answer rather than a reset."""
        body = dumps({"error_msg": _PLAIN_HTTP_MESSAGE})
        head = (
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            # The base class's methods work on the file descriptor, below TLS.
            socket.socket.sendall(self.socket, head + body)
        except OSError:
            return
        self._linger()

    def _linger(self, seconds: float = 0.5) -> None:
        """Half-close and read what the client still sends (bounded), so that the
        close does not turn into a reset that discards our last words."""
        raw = self.socket
        try:
            socket.socket.shutdown(raw, socket.SHUT_WR)
            raw.settimeout(seconds / 2)
            deadline, drained = time.monotonic() + seconds, 0
            while time.monotonic() < deadline and drained < (1 << 20):
                chunk = socket.socket.recv(raw, 65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass


class _LimitedInput:
    """``wsgi.input`` of a chunked request: cheroot's size limit surfaces as the same
    `PayloadTooLarge` (413 JSON) that `mserve.transport.wsgi.read_body` raises itself."""

    def __init__(self, stream: Any, limit: int):
        self._stream = stream
        self._limit = limit

    def _guard(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except cheroot_errors.MaxSizeExceeded:
            raise PayloadTooLarge(f"http message is bigger than {self._limit}") from None
        except OSError as exc:
            # cheroot checks each chunk's announced size before reading it, and says so
            # with a bare IOError (no errno, unlike a socket's).
            if exc.errno is None and "too large" in str(exc).lower():
                raise PayloadTooLarge(f"http message is bigger than {self._limit}") from None
            raise

    def read(self, size: int | None = None) -> bytes:
        return self._guard(self._stream.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._guard(self._stream.readline, size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._guard(self._stream.readlines, hint)

    def __iter__(self) -> Any:
        while True:
            line = self.readline()
            if not line:
                return
            yield line


class _Server(wsgi.Server):
    """cheroot's WSGI server on an already listening socket, with TLS handshakes in
    worker threads (see the module doc)."""

    ConnectionClass = _Connection

    def __init__(self, app: Any, sock: socket.socket, adapter: _Adapter, *, threads: int, max_body_bytes: int,
                 idle_timeout: float, io_timeout: float):
        super().__init__(
            sock.getsockname()[:2],
            app,
            numthreads=threads,
            max=threads,
            server_name="mserve",
            request_queue_size=1024,
            timeout=idle_timeout,  # idle keep-alive (and not-yet-talking) connections close after this
        )
        self._adopted = sock
        self.ssl_adapter = adapter
        self.max_request_body_size = max_body_bytes  # cheroot refuses Content-Length > this, unread
        self.keep_alive_conn_limit = 1000  # cheroot's default of 10 closes the 11th keep-alive connection
        self.io_timeout = io_timeout
        self.handshake_failures = 0
        self.handshaking: set[_Connection] = set()  # connections handshaking in a worker now

    def abort_handshakes(self) -> None:
        """Cut the connections still handshaking (they carry no request yet), so a
        client stalled half-way through its ClientHello does not hold a stop up."""
        for conn in list(self.handshaking):
            try:
                # The base class's shutdown works on the descriptor, below TLS: the
                # worker's blocked handshake returns at once.
                socket.socket.shutdown(conn.socket, socket.SHUT_RDWR)
            except OSError:
                pass

    def bind(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """Serve the socket we were given instead of binding one."""
        self.socket = self._adopted
        self.bind_addr = self.resolve_real_bind_addr(self._adopted)
        return self._adopted

    def prepare(self) -> None:
        super().prepare()
        if self.socket is not self._adopted:  # cheroot took systemd's LISTEN_PID socket instead
            self.stop()
            raise RuntimeError("cheroot did not adopt the listening socket (is LISTEN_PID set?)")
        # Non-blocking accept: with worker processes sharing the socket, another one may
        # take the connection between select and accept (cheroot then skips it).
        self.socket.setblocking(False)

    def process_conn(self, conn: Any) -> None:
        if getattr(conn, "fresh", False):
            conn.fresh = False
            self.put_conn(conn)  # into the selector until the client sends its ClientHello
            return
        super().process_conn(conn)

    def error_log(self, msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        log.log(level, "%s", msg, exc_info=traceback)


class _Counted:
    """The app as cheroot calls it: counts requests, guards chunked input."""

    def __init__(self, app: InFlight, limit: int):
        self.app = app
        self.limit = limit
        self.served = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with self._lock:
            self.served += 1
        stream = environ.get("wsgi.input")
        if isinstance(stream, ChunkedRFile):
            environ["wsgi.input"] = _LimitedInput(stream, self.limit)
        return self.app(environ, start_response)


class TlsTransport:
    """A WSGI app on a listening socket over HTTPS, served by cheroot in background
    threads; the same interface as `mserve.transport.http.WaitressTransport`."""

    scheme = "https"

    def __init__(
        self,
        app: Callable[..., Any],
        sock: socket.socket,
        ssl_config: Any,
        *,
        threads: int,
        max_body_bytes: int,
        idle_timeout: float = 120.0,
        io_timeout: float = 30.0,
    ):
        self.context = build_ssl_context(ssl_config)
        self.socket = sock
        self._port = sock.getsockname()[1]
        self.app = InFlight(app)
        self._counted = _Counted(self.app, max_body_bytes)
        self._server = _Server(
            self._counted,
            sock,
            _Adapter(self.context),
            threads=threads,
            max_body_bytes=max_body_bytes,
            idle_timeout=idle_timeout,
            io_timeout=io_timeout,
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def requests_started(self) -> int:
        """Requests that reached the app so far (a refused handshake reaches none)."""
        return self._counted.served

    @property
    def handshake_failures(self) -> int:
        return self._server.handshake_failures

    def start(self) -> None:
        """Start serving; returns once the worker threads run."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            # Threads started from this daemon thread (cheroot's workers) are daemons too.
            try:
                self._server.prepare()
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failed.append(exc)
                ready.set()
                return
            ready.set()
            try:
                self._server.serve()
            except Exception:  # pragma: no cover - cheroot's loop is not expected to raise
                log.exception("HTTPS loop stopped")

        self._thread = threading.Thread(target=run, name="mserve-https", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise RuntimeError(f"cannot start the HTTPS server: {failed[0]}") from failed[0]

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting and close idle connections, let in-flight requests finish
        (up to ``drain_timeout``), then close everything."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._server.shutdown_timeout = drain_timeout
        # cheroot's stop closes the listener and idle connections at once, then waits
        # for its workers; a worker stuck past the timeout must not hang us.
        stopper = threading.Thread(target=self._server.stop, name="mserve-https-stop", daemon=True)
        stopper.start()
        while stopper.is_alive() and self._server.ready:
            time.sleep(0.005)  # cheroot's stop has begun: no new connections from now on
        self._server.abort_handshakes()
        if not self.app.wait_idle(drain_timeout):
            log.warning("drain timeout: %d request(s) still running", self.app.count)
        stopper.join(timeout=5)
        self._thread.join(timeout=5)
