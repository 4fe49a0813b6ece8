"""HTTPS: the RESTful server over TLS, one-way or mutual (``SSLConfig``).

The HTTPS transport is the HTTP one (`mserve.transport.http`, Waitress) with TLS
spoken inside its event loop: each connection's channel runs an `ssl.SSLObject` over
memory buffers (``SSLContext.wrap_bio``), feeding it what the socket delivers and
sending what it produces, all without blocking. So HTTPS holds up exactly as plain
HTTP does, with the same code:

* a client that connects and sends nothing, or half a ClientHello, or half a
  request, costs one idle channel (memory), never a thread: the handshake advances
  whenever bytes arrive, and is cut after ``handshake_timeout``;
* the same limits (``max_connections`` with eviction of the longest-idle, idle and
  header timeouts, ``max_header_bytes``), the same request parser (conflicting
  Content-Length, NUL/CR in header values, a bad request line: 400 on both), the
  same JSON refusals (413 from Content-Length before the body is read), the same
  fast 503 load shedding and quick predicts on the I/O thread;
* a failed handshake (no client certificate, one from another CA, a client that
  does not trust us) closes the connection before any request is read; plain HTTP
  sent here gets a plain-text ``400`` with a JSON ``{"error_msg"}`` body.

Until this, HTTPS was cheroot with its handshake moved to worker threads; it could
not hold: 16 clients sending half a ClientHello (or half a request after the
handshake) held all 16 threads for the 30 s I/O timeout, and a 200 MB header was
read whole (README, "Why Waitress for HTTPS too").
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from typing import Any, Callable

from .balance import ConnectionBalance
from .http import ConnectionLimits, WaitressTransport, ServingChannel, ServingServer, json_error_reply
from .inline import InlinePolicy

log = logging.getLogger("mserve.transport.https")

_PLAIN_HTTP_MESSAGE = "this port speaks HTTPS only: the client sent plain HTTP, use https://"
_RECV_BYTES = 1 << 16


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


# ------------------------------------------------------------------------ the channel


class _TlsChannel(ServingChannel):
    """A Waitress channel that speaks TLS through an `ssl.SSLObject` on memory BIOs.

    Reads: raw bytes from the socket go into the incoming BIO; the handshake, then
    the plaintext, come out of the SSL object. Writes (`send`, which Waitress's
    flushing calls with plaintext) are encrypted into the outgoing BIO and sent; what
    the socket does not take at once waits in ``_raw_out`` and keeps the channel
    writable. One lock guards the SSL object: the I/O thread reads while a worker
    thread may be sending a reply."""

    detect_tls = False
    fresh = False

    def __init__(self, server: Any, sock: socket.socket, addr: Any, adj: Any, map: Any = None):
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = server.ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._tls_lock = threading.Lock()
        self._raw_out = bytearray()
        self.handshaken = False
        self.connected_at = time.monotonic()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(server, sock, addr, adj, map)

    # ---- reading

    def handle_read(self) -> None:
        if self.half_closed:
            self.drain()
            return
        try:
            raw = self.socket.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.handle_close()
            return
        if not raw:
            self.handle_close()
            return
        if self.will_close:
            return  # refused: what comes now is discarded
        plain = b""
        with self._tls_lock:
            self._incoming.write(raw)
            if not self.handshaken and not self._handshake():
                self._move_out()
            else:
                plain = self._read_plain()
                self._move_out()
        if self._raw_out:
            self._send_raw()
        if plain:
            self.last_activity = time.time()
            self.received(plain)
            self.serve_inline()

    def _handshake(self) -> bool:
        """Advance the handshake with what has arrived; True once it is done."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            self._refuse(exc)
            return False
        self.handshaken = True
        self.environ_extra = _tls_environ(self._tls, self.server.ssl_context.verify_mode == ssl.CERT_REQUIRED)
        return True

    def _refuse(self, exc: ssl.SSLError) -> None:
        peer = self.addr
        reason = _reason(exc)
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST") or "http request" in str(exc).lower():
            log.info("client %s sent plain HTTP to the HTTPS port", peer)
            # Nothing was encrypted yet: answer in plain text.
            self._outgoing.read()
            self._raw_out += json_error_reply("400 Bad Request", _PLAIN_HTTP_MESSAGE)
        else:
            log.info("TLS handshake with %s failed: %s", peer, reason)
        self.server.handshake_failures += 1
        # OpenSSL's alert (or our answer) goes out, then a gentle close.
        self.linger_after = True
        self.will_close = True

    def _read_plain(self) -> bytes:
        parts = []
        while True:
            try:
                chunk = self._tls.read(_RECV_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client's close_notify
                if not self.requests:
                    self.will_close = True
                break
            except ssl.SSLError as exc:
                log.info("TLS error from %s: %s", self.addr, _reason(exc))
                self.will_close = True
                break
            if not chunk:
                break
            parts.append(chunk)
            if not self._incoming.pending and not self._tls.pending():
                break  # all read: asking again would only raise SSLWantReadError
        return b"".join(parts) if len(parts) != 1 else parts[0]

    # ---- writing

    def _move_out(self) -> None:
        pending = self._outgoing.pending
        if pending:
            self._raw_out += self._outgoing.read(pending)

    def _send_raw(self) -> None:
        """Send what is waiting, as far as the socket takes it now."""
        with self._tls_lock:
            while self._raw_out:
                try:
                    sent = self.socket.send(self._raw_out)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._raw_out.clear()
                    self.will_close = True
                    return
                del self._raw_out[:sent]

    def send(self, data: Any, do_close: bool = True) -> int:
        """Waitress's send: encrypt ``data`` (plaintext) and send it. Returns the
        plaintext bytes taken; 0 while earlier ciphertext still waits for the socket."""
        if self._raw_out:
            self._send_raw()
            if self._raw_out:
                return 0
        with self._tls_lock:
            try:
                taken = self._tls.write(data)
            except ssl.SSLError as exc:
                raise OSError(f"TLS write failed: {_reason(exc)}") from None
            sealed = self._outgoing.read()
            if sealed:  # straight to the socket; what it does not take now waits in _raw_out
                try:
                    sent = self.socket.send(sealed)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = len(sealed)  # the connection is gone: nothing more to send
                    self.will_close = True
                if sent < len(sealed):
                    self._raw_out += memoryview(sealed)[sent:]
        if taken:
            self.last_activity = time.time()
        return taken

    def writable(self) -> bool:
        return bool(self._raw_out) or bool(super().writable())

    def handle_write(self) -> None:
        if self._raw_out:
            self._send_raw()
            if self._raw_out:
                return
        super().handle_write()

    def all_sent(self) -> bool:
        return not self._raw_out

    def expired(self, now: float, wall: float, limits: ConnectionLimits) -> str | None:
        if not self.handshaken and not self.half_closed and now - self.connected_at > limits.handshake_timeout:
            return "TLS handshake not complete within handshake_timeout"
        return super().expired(now, wall, limits)

    def evictable(self) -> bool:
        return super().evictable() and not self._raw_out


def _tls_environ(tls: ssl.SSLObject, verify_client: bool) -> dict[str, Any]:
    """WSGI environ entries for a connection whose handshake is done."""
    cipher = tls.cipher() or ("", "", 0)
    env: dict[str, Any] = {"HTTPS": "on", "SSL_PROTOCOL": tls.version() or "", "SSL_CIPHER": cipher[0]}
    env["SSL_CLIENT_VERIFY"] = "NONE"
    if verify_client:
        cert = tls.getpeercert() or {}
        if cert:
            env["SSL_CLIENT_VERIFY"] = "SUCCESS"
            subject = dict(item for rdn in cert.get("subject", ()) for item in rdn)
            if "commonName" in subject:
                env["SSL_CLIENT_S_DN_CN"] = subject["commonName"]
    return env


class _TlsServer(ServingServer):
    channel_class = _TlsChannel
    ssl_context: ssl.SSLContext
    handshake_failures = 0


class _Counted:
    """The app, counting the requests that reach it (a refused handshake reaches none)."""

    def __init__(self, app: Callable[..., Any]):
        self.app = app
        self.served = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        with self._lock:
            self.served += 1
        return self.app(environ, start_response)

    def direct_predict(self, *args: Any) -> Any:
        """The app's direct predicts (`mserve.transport.direct`), counted alike."""
        answer = self.app.direct_predict(*args)
        if answer is not None:
            with self._lock:
                self.served += 1
        return answer


class TlsTransport(WaitressTransport):
    """A WSGI app on a listening socket over HTTPS; the HTTP transport with TLS."""

    scheme = "https"
    server_class = _TlsServer

    def __init__(
        self,
        app: Callable[..., Any],
        sock: socket.socket,
        ssl_config: Any,
        *,
        threads: int,
        max_body_bytes: int,
        balance: ConnectionBalance | None = None,
        inline: InlinePolicy | None = None,
        limits: ConnectionLimits | None = None,
        shed: Callable[[int], bool] | None = None,
    ):
        self.context = build_ssl_context(ssl_config)
        self._counted = _Counted(app)
        super().__init__(
            self._counted, sock, threads=threads, max_body_bytes=max_body_bytes, balance=balance, inline=inline,
            limits=limits, shed=shed,
        )
        self._server.ssl_context = self.context

    @property
    def requests_started(self) -> int:
        """Requests that reached the app so far (a refused handshake reaches none)."""
        return self._counted.served

    @property
    def handshake_failures(self) -> int:
        return self._server.handshake_failures
