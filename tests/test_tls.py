"""HTTPS (``SSLConfig``): one-way and mutual TLS against real servers, with
certificates made by trustme; start-up errors; the failure modes a TLS front end
must survive (plain HTTP on the HTTPS port, clients that connect and say nothing);
the server's own refusals in JSON, as on the HTTP path; graceful stop.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import pytest
import requests
import trustme

from mserve import server
from mserve.transport.https import TlsTransport, build_ssl_context
from mserve.transport.http import bind_socket

from support import ADD_BODY, BUNDLED, serving

ADD = "/model/add:add_common"
EXPECTED = {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
LIMIT = 1024 * 1024  # max_msg_mb_size=1


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """CA, server cert (127.0.0.1, localhost), client cert; a second CA with its own
    client cert; a key that belongs to another certificate."""
    d = tmp_path_factory.mktemp("certs")
    ca, other_ca = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@mserve.test", common_name="good-client")
    stranger = other_ca.issue_cert("stranger@mserve.test")
    unrelated = ca.issue_cert("unrelated.test")
    paths = SimpleNamespace(
        ca=d / "ca.pem",
        other_ca=d / "other_ca.pem",
        cert=d / "server.crt",
        key=d / "server.key",
        client=d / "client.pem",
        stranger=d / "stranger.pem",
        wrong_key=d / "wrong.key",
        dir=d,
    )
    ca.cert_pem.write_to_path(paths.ca)
    other_ca.cert_pem.write_to_path(paths.other_ca)
    server_cert.cert_chain_pems[0].write_to_path(paths.cert)
    server_cert.private_key_pem.write_to_path(paths.key)
    client.private_key_and_cert_chain_pem.write_to_path(paths.client)
    stranger.private_key_and_cert_chain_pem.write_to_path(paths.stranger)
    unrelated.private_key_pem.write_to_path(paths.wrong_key)
    return paths


@pytest.fixture(scope="module")
def servers(certs):
    """The add servable over plain HTTP, HTTPS one-way and HTTPS mutual (4 threads
    each, 1 MB body limit), all in this process."""
    one_way_cfg = server.SSLConfig(str(certs.cert), str(certs.key))
    mutual_cfg = server.SSLConfig(str(certs.cert), str(certs.key), custom_ca=str(certs.ca), verify_client=True)
    with serving(server.ServableStartConfig(BUNDLED, "add"), max_msg_mb_size=1, threads=4) as http_url:
        one_way = server.start_restful_server("127.0.0.1:0", max_msg_mb_size=1, ssl_config=one_way_cfg, threads=4,
                                             additional=True)
        mutual = server.start_restful_server("127.0.0.1:0", max_msg_mb_size=1, ssl_config=mutual_cfg, threads=4,
                                            additional=True)
        yield SimpleNamespace(http=http_url, one_way=one_way, mutual=mutual)


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def tls_client(certs, client_pem=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if client_pem is not None:
        ctx.load_cert_chain(str(client_pem))
    return ctx


def raw_exchange(certs, port: int, data: bytes, client_pem=None) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` over TLS on a fresh connection; read one response to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
        with tls_client(certs, client_pem).wrap_socket(tcp, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            reply = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# ---------------------------------------------------------------------------- one-way


def test_one_way_success(servers, certs):
    assert servers.one_way.url.startswith("https://127.0.0.1:")
    r = requests.post(servers.one_way.url + ADD, json=ADD_BODY, verify=str(certs.ca))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == EXPECTED


def test_one_way_by_hostname_and_keep_alive(servers, certs):
    url = f"https://localhost:{servers.one_way.port}{ADD}"
    with requests.Session() as session:
        for _ in range(5):
            r = session.post(url, json=ADD_BODY, verify=str(certs.ca))
            assert r.status_code == 200 and r.json() == EXPECTED


def test_one_way_insecure_client(servers):
    """``curl --insecure``: the client skips verifying the server."""
    import urllib3

    with pytest.warns(urllib3.exceptions.InsecureRequestWarning):
        r = requests.post(servers.one_way.url + ADD, json=ADD_BODY, verify=False)
    assert r.json() == EXPECTED


def test_server_cert_not_trusted_by_client_is_refused(servers, certs):
    before = servers.one_way.transport.requests_started
    failures = servers.one_way.transport.handshake_failures
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(servers.one_way.url + ADD, json=ADD_BODY, verify=str(certs.other_ca))
    assert wait_for(lambda: servers.one_way.transport.handshake_failures > failures)
    assert servers.one_way.transport.requests_started == before


def test_tls_1_2_or_newer(servers, certs):
    with socket.create_connection(("127.0.0.1", servers.one_way.port), timeout=5) as tcp:
        with tls_client(certs).wrap_socket(tcp, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.selected_alpn_protocol() in (None, "http/1.1")
    ctx = build_ssl_context(server.SSLConfig(str(certs.cert), str(certs.key)))
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE


# ----------------------------------------------------------------------------- mutual


def test_mutual_success(servers, certs):
    r = requests.post(servers.mutual.url + ADD, json=ADD_BODY, verify=str(certs.ca), cert=str(certs.client))
    assert r.status_code == 200
    assert r.json() == EXPECTED


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-client-cert", "cert-from-another-ca"])
def test_mutual_refuses_client(servers, certs, client):
    """Without a client certificate, or with one from another CA, the handshake fails
    and no request reaches the app."""
    transport = servers.mutual.transport
    before, failures = transport.requests_started, transport.handshake_failures
    cert = str(certs.stranger) if client else None
    with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is one
        requests.post(servers.mutual.url + ADD, json=ADD_BODY, verify=str(certs.ca), cert=cert, timeout=10)
    assert wait_for(lambda: transport.handshake_failures > failures)
    assert transport.requests_started == before
    # ... and the server goes on serving good clients.
    r = requests.post(servers.mutual.url + ADD, json=ADD_BODY, verify=str(certs.ca), cert=str(certs.client))
    assert r.json() == EXPECTED


def test_mutual_context(certs):
    ctx = build_ssl_context(server.SSLConfig(str(certs.cert), str(certs.key), str(certs.ca), True))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


# -------------------------------------------------------------------- start-up errors


def test_mismatched_key_is_refused_at_start(certs):
    cfg = server.SSLConfig(str(certs.cert), str(certs.wrong_key))
    with pytest.raises(RuntimeError, match=f"load private_key from {certs.wrong_key} failed"):
        server.start_restful_server("127.0.0.1:0", ssl_config=cfg, additional=True)


def test_verify_client_without_custom_ca_is_refused(certs):
    cfg = server.SSLConfig(str(certs.cert), str(certs.key), custom_ca=None, verify_client=True)
    with pytest.raises(RuntimeError, match="custom_ca"):
        server.start_restful_server("127.0.0.1:0", ssl_config=cfg, additional=True)


@pytest.mark.parametrize("missing", ["certificate", "private_key", "custom_ca"])
def test_missing_files_are_refused(certs, missing):
    files = {"certificate": str(certs.cert), "private_key": str(certs.key), "custom_ca": str(certs.ca)}
    files[missing] = str(certs.dir / "nope.pem")
    cfg = server.SSLConfig(files["certificate"], files["private_key"], files["custom_ca"], verify_client=True)
    with pytest.raises(RuntimeError, match=f"load {missing} from .*nope.pem failed: no such file"):
        build_ssl_context(cfg)


def test_unreadable_or_invalid_files_are_refused(certs):
    garbage = certs.dir / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(RuntimeError, match="load certificate from .*garbage.pem failed"):
        build_ssl_context(server.SSLConfig(str(garbage), str(certs.key)))
    with pytest.raises(RuntimeError, match="load private_key from .*garbage.pem failed"):
        build_ssl_context(server.SSLConfig(str(certs.cert), str(garbage)))
    with pytest.raises(RuntimeError, match="load custom_ca from .*garbage.pem failed"):
        build_ssl_context(server.SSLConfig(str(certs.cert), str(certs.key), str(garbage), True))
    with pytest.raises(RuntimeError, match="load certificate from .* failed"):
        build_ssl_context(server.SSLConfig(str(certs.dir), str(certs.key)))  # a folder


# ------------------------------------------------------------------ hostile or broken clients


def test_plain_http_to_https_port_fails_cleanly(servers, certs):
    plain_url = servers.one_way.url.replace("https://", "http://")
    before = servers.one_way.transport.requests_started
    r = requests.post(plain_url + ADD, json=ADD_BODY, timeout=10)
    assert r.status_code == 400
    assert "HTTPS" in r.json()["error_msg"]
    assert servers.one_way.transport.requests_started == before
    # Garbage that is not HTTP either: the connection just closes.
    with socket.create_connection(("127.0.0.1", servers.one_way.port), timeout=5) as s:
        s.sendall(b"\x00\x01\x02garbage" * 10)
        s.settimeout(5)
        assert s.recv(1024) == b""
    r = requests.post(servers.one_way.url + ADD, json=ADD_BODY, verify=str(certs.ca))
    assert r.json() == EXPECTED


def test_silent_clients_do_not_stop_others(servers, certs):
    """Clients that connect and never send a ClientHello (more of them than worker
    threads), and some that stop half-way through one, must not delay anybody else:
    cheroot's own TLS adapter and a TLS-wrapped Waitress both freeze here."""
    port = servers.one_way.port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    partial = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        for s in partial:
            s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello record, then nothing
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(3):
            r = requests.post(servers.one_way.url + ADD, json=ADD_BODY, verify=str(certs.ca), timeout=5)
            assert r.json() == EXPECTED
        assert time.monotonic() - started < 3.0
    finally:
        for s in silent + partial:
            s.close()


# ------------------------------------------------------------ same behaviour as HTTP


def test_over_limit_body_is_refused_unread_with_json(servers, certs):
    request = (
        f"POST {ADD} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {2 * LIMIT}\r\n\r\n"
    ).encode()
    status, headers, body = raw_exchange(certs, servers.one_way.port, request)  # no body is ever sent
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert headers["connection"].lower() == "close"
    assert json.loads(body) == {"error_msg": f"http message is bigger than {LIMIT}"}


def test_over_limit_chunked_body_is_refused_with_json(servers, certs):
    request = (
        f"POST {ADD} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Transfer-Encoding: chunked\r\n\r\n{2 * LIMIT:x}\r\n"
    ).encode()
    status, _, body = raw_exchange(certs, servers.one_way.port, request)
    assert status == 413
    assert json.loads(body) == {"error_msg": f"http message is bigger than {LIMIT}"}


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/model/nope:add_common", ADD_BODY),
        ("POST", ADD, "{not json"),
        ("GET", ADD, None),
        ("POST", ADD, {"instances": []}),
    ],
)
def test_same_answers_as_plain_http(servers, certs, method, path, body):
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    plain = requests.request(method, servers.http + path, **kwargs)
    tls = requests.request(method, servers.one_way.url + path, verify=str(certs.ca), **kwargs)
    assert (tls.status_code, tls.headers["Content-Type"], tls.json()) == (
        plain.status_code,
        plain.headers["Content-Type"],
        plain.json(),
    )


def test_malformed_request_is_refused_with_json(servers, certs):
    status, headers, body = raw_exchange(certs, servers.one_way.port, b"BLAH\r\n\r\n")
    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "error_msg" in json.loads(body)


# ----------------------------------------------------------------------- graceful stop


def test_graceful_stop_finishes_in_flight_requests(certs):
    entered = threading.Event()

    def slow_app(environ, start_response):
        entered.set()
        time.sleep(1.0)
        body = b'{"slow":true}'
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    sock = bind_socket("127.0.0.1", 0)
    transport = TlsTransport(
        slow_app, sock, server.SSLConfig(str(certs.cert), str(certs.key)), threads=2, max_body_bytes=LIMIT
    )
    transport.start()
    url = f"https://127.0.0.1:{transport.port}/slow"
    idle = requests.Session()  # an idle keep-alive connection must not hold the stop up
    idle.get(url, verify=str(certs.ca))
    entered.clear()
    results: list = []
    worker = threading.Thread(target=lambda: results.append(requests.get(url, verify=str(certs.ca), timeout=10)))
    worker.start()
    assert entered.wait(5)
    stalled = socket.create_connection(("127.0.0.1", transport.port))  # half a ClientHello, then nothing
    stalled.sendall(b"\x16\x03\x01")
    time.sleep(0.1)
    started = time.monotonic()
    transport.stop(drain_timeout=10)
    elapsed = time.monotonic() - started
    worker.join(5)
    assert results and results[0].status_code == 200 and results[0].json() == {"slow": True}
    assert elapsed < 3  # the in-flight request (1 s), not the stalled client (io_timeout 30 s)
    stalled.close()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, verify=str(certs.ca), timeout=2)
    idle.close()
    transport.stop()  # twice is fine


def test_keep_alive_predicts_over_tls_take_the_direct_lane_and_count_as_started(servers, certs):
    """Once the path is known to be quick, a keep-alive HTTPS predict is answered
    straight from the decrypted read (mserve.transport.direct), like plain HTTP. A
    server of its own with a generous inline limit: on a loaded machine the add
    servable can look slower than the default 1 ms, and the lane is what is tested."""
    mutual_cfg = server.SSLConfig(str(certs.cert), str(certs.key), custom_ca=str(certs.ca), verify_client=True)
    started = server.start_restful_server("127.0.0.1:0", ssl_config=mutual_cfg, threads=4, inline_max_ms=50,
                                          additional=True)  # stopped with the module's servers
    transport = started.transport
    url = f"https://127.0.0.1:{started.port}{ADD}"
    with requests.Session() as session:
        session.cert = str(certs.client)
        before_direct, before_started = transport.direct_requests, transport.requests_started
        # The inline policy may send the path back to the worker threads for a while
        # when the machine is loaded (waiting for the GIL counts as blocked): keep
        # asking, up to 15 s, until ten requests took the lane.
        sent, deadline = 0, time.monotonic() + 15
        while (sent < 20 or transport.direct_requests - before_direct < 10) and time.monotonic() < deadline:
            r = session.post(url, json=ADD_BODY, verify=str(certs.ca), headers={"X-Request-ID": "tls-direct"})
            sent += 1
            assert r.status_code == 200 and r.json() == EXPECTED
            assert r.headers["X-Request-ID"] == "tls-direct"
    assert transport.direct_requests - before_direct >= 10
    assert transport.requests_started - before_started == sent
