"""Hostile clients, overload and broken stages (issue 13): each finding has a test
here that failed before the fix. Real servers on 127.0.0.1, real sockets; floods
are bounded in count, and every wait has a timeout.

Times asserted here are ceilings far above what a healthy server needs and far
below what the old failure cost (a lockout until a 30 s or 120 s timeout, a reply
after the stage's 5 s instead of the 1 s deadline); they tell the two apart."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import requests
import trustme

from mserve import server
from mserve.transport.http import bind_socket
from mserve.transport.workers import WorkerPool
from support import ADD_BODY, BUNDLED, serving, write_servable

ADD = "/model/add:add_common"
EXPECTED = {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}

STAGES_CONFIG = """
import time

import numpy as np

from mserve import register


def echo(x):
    return x


def nap(x):
    seconds = float(x)
    if seconds > 0:
        time.sleep(seconds)
    return x


def exits(x):
    raise SystemExit(3)


def interrupts(x):
    raise KeyboardInterrupt


def missing_file(x):
    open("/srv/secret/models/weights.bin")


def bad_input(x):
    raise ValueError("cannot read /srv/secret/models/input.png: not an image")


def not_a_number(x):
    return np.array([1.0, float("nan")], np.float32)


@register.register_method(output_names=["y"])
def echo(x):
    return register.add_stage(echo, x, outputs_count=1)


@register.register_method(output_names=["y"])
def nap(x):
    return register.add_stage(nap, x, outputs_count=1, tag="Nap")


@register.register_method(output_names=["y"])
def exits(x):
    return register.add_stage(exits, x, outputs_count=1, tag="Preprocess")


@register.register_method(output_names=["y"])
def interrupts(x):
    return register.add_stage(interrupts, x, outputs_count=1, tag="Preprocess")


@register.register_method(output_names=["y"])
def missing_file(x):
    return register.add_stage(missing_file, x, outputs_count=1, tag="Loader")


@register.register_method(output_names=["y"])
def bad_input(x):
    return register.add_stage(bad_input, x, outputs_count=1, tag="Decode")


@register.register_method(output_names=["y"])
def nan(x):
    return register.add_stage(not_a_number, x, outputs_count=1, tag="Model")
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for name in ("stages", "数字"):
        write_servable(root, name, STAGES_CONFIG)
        (root / name / "1").mkdir()
    return root


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-certs")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(d / "ca.pem")
    issued.cert_chain_pems[0].write_to_path(d / "server.crt")
    issued.private_key_pem.write_to_path(d / "server.key")
    return SimpleNamespace(ca=d / "ca.pem", cert=d / "server.crt", key=d / "server.key")


@pytest.fixture(scope="module")
def servers(root, certs):
    """The add and stages servables over HTTP (default settings but 4 threads) and
    HTTPS (the same), in this process."""
    configs = [server.ServableStartConfig(BUNDLED, "add"), server.ServableStartConfig(root, "stages"),
               server.ServableStartConfig(root, "数字")]
    with serving(configs, threads=4, request_timeout=1.0) as http_url:
        tls = server.start_restful_server("127.0.0.1:0", threads=4, request_timeout=1.0, additional=True,
                                          ssl_config=server.SSLConfig(str(certs.cert), str(certs.key)))
        yield SimpleNamespace(http=http_url, https=tls.url, https_port=tls.port,
                              port=int(http_url.rsplit(":", 1)[1]), ca=str(certs.ca))


@contextlib.contextmanager
def own_server(servers, **restful):
    """Another RESTful server with its own settings over the servables ``servers``
    loaded; stopping it leaves the shared ones running."""
    started = server.start_restful_server("127.0.0.1:0", additional=True, **restful)
    try:
        yield started.url
    finally:
        started.transport.stop(drain_timeout=5)
        server.default_runtime().transports.remove(started.transport)


def post(url: str, path: str, body, **kwargs):
    return requests.post(url + path, json=body, timeout=10, **kwargs)


def one(x) -> dict:
    return {"instances": [{"x": x}]}


def exchange(port: int, data: bytes, tls: ssl.SSLContext | None = None, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection, read until the server closes or goes
    quiet for ``timeout``; b"" means no answer at all."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        sock = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        sock.sendall(data)
        reply = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
                if b"\r\n\r\n" in reply:
                    head, _, rest = reply.partition(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(rest) >= length[0]:
                        break
        except (socket.timeout, ConnectionResetError, ssl.SSLError):
            pass
        return reply


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1."), reply[:200]
    return int(reply.split(b" ", 2)[1])


def json_body(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


def tls_client(ca: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca)


# ------------------------------------------------- 1: idle and keep-alive connection floods


def test_a_thousand_idle_connections_do_not_lock_out_new_clients(servers):
    """1,100 idle TCP connections plus 100 keep-alive ones that made a request and
    stay open: a new client is still answered (Waitress used to stop accepting at
    1,000 connections until its 120 s channel timeout)."""
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection(("127.0.0.1", servers.port), timeout=5))
        keep = [requests.Session() for _ in range(100)]
        with ThreadPoolExecutor(8) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda s: s.post(servers.http + ADD, json=ADD_BODY,
                                                                                  timeout=10), keep))
        started = time.monotonic()
        for _ in range(5):
            assert requests.post(servers.http + ADD, json=ADD_BODY, timeout=10).json() == EXPECTED
        assert time.monotonic() - started < 5
        for s in keep:
            s.close()
    finally:
        for s in idle:
            s.close()


def test_at_the_connection_limit_the_longest_idle_make_room(servers):
    with own_server(servers, threads=2, max_connections=50) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(120)]
        try:
            for _ in range(5):
                assert requests.post(url + ADD, json=ADD_BODY, timeout=10).json() == EXPECTED
            transport = next(t for t in server.default_runtime().transports if url.endswith(f":{t.port}"))
            assert transport.connections <= 50
            assert transport.evicted >= 70
            # The oldest were closed: the first idle connection reads EOF.
            idle[0].settimeout(5)
            assert idle[0].recv(1) == b""
        finally:
            for s in idle:
                s.close()


def test_a_request_head_sent_too_slowly_is_cut(servers):
    with own_server(servers, threads=2, header_timeout=1.0, idle_timeout=60) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            try:
                while slow.recv(1024):  # one header byte a while would not help either
                    pass
            except ConnectionResetError:
                pass
            assert time.monotonic() - started < 8  # cut after ~1-2 s, not the 60 s idle timeout


# ------------------------------------------------------------- 2: HTTPS floods and limits


def test_https_half_handshakes_and_half_requests_do_not_stop_service(servers):
    """More stalled clients than threads: half a ClientHello, and a finished
    handshake followed by half a request. cheroot held a thread for each (30 s)."""
    stalled = []
    ctx = tls_client(servers.ca)
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", servers.https_port), timeout=5)
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            stalled.append(s)
        for _ in range(12):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", servers.https_port), timeout=5),
                                server_hostname="127.0.0.1")
            s.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Le")
            stalled.append(s)
        time.sleep(0.3)
        started = time.monotonic()
        for _ in range(3):
            r = post(servers.https, ADD, ADD_BODY, verify=servers.ca)
            assert r.json() == EXPECTED
        assert time.monotonic() - started < 5
    finally:
        for s in stalled:
            s.close()


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_header_size_is_bounded_and_the_refusal_arrives(servers, scheme):
    """A header that never ends is refused at the limit (64 KiB by default) instead
    of being read whole (cheroot read 200 MB into memory), and the client reads the
    431 even though it was still sending (the server drains before closing)."""
    raw = socket.create_connection(("127.0.0.1", servers.https_port if scheme == "https" else servers.port),
                                   timeout=10)
    with (tls_client(servers.ca).wrap_socket(raw, server_hostname="127.0.0.1") if scheme == "https" else raw) as s:
        s.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        sent = 0
        try:
            while sent < 4 << 20:
                s.sendall(line * 64)
                sent += len(line) * 64
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            pass
        s.settimeout(5)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (socket.timeout, ConnectionResetError, ssl.SSLError):
            pass
    assert sent < 4 << 20 or reply, "the server read 4 MB of header without answering"
    assert status_of(reply) == 431
    assert "error_msg" in json_body(reply)


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nContent-Length: 7\r\n",  # conflicting lengths
        b"X-Bad: a\x00b\r\nContent-Length: 0\r\n",  # NUL in a value
        b"X-Bad: a\rb\r\nContent-Length: 0\r\n",  # a bare CR in a value
    ],
)
def test_https_parses_as_strictly_as_http(servers, headers):
    request = b"POST " + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n12345"
    plain = exchange(servers.port, request)
    tls = exchange(servers.https_port, request, tls_client(servers.ca))
    assert status_of(plain) == 400
    assert status_of(tls) == 400
    assert json_body(tls) == json_body(plain)


# ---------------------------------------------------- 3: --workers 2 with idle connections


def test_workers_accept_promptly_while_idle_connections_are_held():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    pool = WorkerPool([server.ServableStartConfig(BUNDLED, "add")], sock, workers=2)
    pool.start()
    idle = []
    try:
        for _ in range(2):
            # 20 idle connections arrive, and a client right behind them: each accept
            # tipped the balance, and the worker whose turn it became was often
            # asleep in a 1 s poll chosen before (about 2 accepts per second).
            started = time.monotonic()
            idle += [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
            for _ in range(3):
                r = requests.post(f"http://127.0.0.1:{port}{ADD}", json=ADD_BODY, headers={"Connection": "close"},
                                  timeout=30)
                assert r.json() == EXPECTED
            assert time.monotonic() - started < 3
    finally:
        for s in idle:
            s.close()
        pool.stop(drain_timeout=5)


# --------------------------------------------------------- 4: instances per request


def test_instances_per_request_are_capped(servers):
    instance = ADD_BODY["instances"][0]
    body = {"instances": [instance] * 10001}
    r = post(servers.http, ADD, body)
    assert r.status_code == 413
    assert "10001 instances" in r.json()["error_msg"] and "10000" in r.json()["error_msg"]
    r = post(servers.http, ADD, {"instances": [instance] * 100})
    assert r.status_code == 200 and len(r.json()["instances"]) == 100


# ------------------------------------------------------ 5: stages raising BaseException


@pytest.mark.parametrize("method", ["exits", "interrupts"])
def test_a_stage_raising_systemexit_or_keyboardinterrupt_gets_a_reply(servers, method, caplog):
    with caplog.at_level(logging.ERROR, logger="mserve"):
        for _ in range(6):  # enough for the inline policy to run it on the I/O thread too
            r = post(servers.http, f"/model/stages:{method}", one(1.0))
            assert r.status_code == 500
            message = r.json()["error_msg"]
            assert message.startswith("Preprocess Failed: internal error in the stage")
            assert r.headers["X-Request-ID"] in message
            assert "Traceback" not in message and ".py" not in message
    logged = [rec for rec in caplog.records if rec.name == "mserve.serving.pipeline"]
    assert logged and logged[-1].exc_info is not None  # the traceback is in the log
    assert post(servers.http, ADD, ADD_BODY).json() == EXPECTED
    r = post(servers.https, f"/model/stages:{method}", one(1.0), verify=servers.ca)
    assert r.status_code == 500


def test_stage_errors_do_not_leak_file_paths(servers):
    r = post(servers.http, "/model/stages:missing_file", one(1.0))
    assert r.status_code == 500
    assert "/srv/secret" not in r.text and "Loader Failed: internal error in the stage (FileNotFoundError)" in r.text
    r = post(servers.http, "/model/stages:bad_input", one(1.0))
    assert r.status_code == 400
    assert r.json()["error_msg"] == "Decode Failed: cannot read <path>: not an image"


# ------------------------------------------- 7: malformed requests on the I/O-thread path


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"post /model/add:add_common HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /model/add\xff:add_common HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /model/a dd:add_common HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /model/add:add_common HTTP/1.1\r\nHost: x\r\nNoColonHere\r\nContent-Length: 0\r\n\r\n",
        b"POST /model/add:add_common HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"POST /model/add:add_common HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_malformed_requests_get_a_json_400(servers, request_bytes):
    reply = exchange(servers.port, request_bytes)
    assert reply, "no answer at all"
    assert status_of(reply) == 400
    assert "error_msg" in json_body(reply)


def test_tls_client_on_the_plain_port_fails_fast(servers):
    """A ClientHello sent to plain HTTP is answered at once instead of waiting for a
    header end that never comes."""
    with socket.create_connection(("127.0.0.1", servers.port), timeout=10) as raw:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        assert time.monotonic() - started < 5
    reply = exchange(servers.port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40)
    assert status_of(reply) == 400 and "use http://" in json_body(reply)["error_msg"]


# ------------------------------------------------------------- 8: the request deadline


def test_the_reply_leaves_at_the_deadline_whatever_the_stage_does(servers):
    started = time.monotonic()
    r = post(servers.http, "/model/stages:nap", one(4.0))
    elapsed = time.monotonic() - started
    assert r.status_code == 504 and r.json() == {"error_msg": "Time out"}
    assert elapsed < 3.5  # request_timeout is 1 s; the stage takes 4
    assert r.headers.get("Connection", "").lower() == "close"
    assert post(servers.http, ADD, ADD_BODY).json() == EXPECTED


def test_a_stage_that_stalls_the_io_thread_does_not_stall_other_connections(servers):
    with own_server(servers, threads=2, request_timeout=10) as url:
        with requests.Session() as warm:
            for _ in range(8):  # the path proves quick: it runs on the I/O thread from now on
                assert warm.post(url + "/model/stages:nap", json=one(0.0), timeout=10).status_code == 200
            done = threading.Event()
            slow = threading.Thread(
                target=lambda: (warm.post(url + "/model/stages:nap", json=one(2.5), timeout=10), done.set()))
            slow.start()
            time.sleep(0.3)
            started = time.monotonic()
            with requests.Session() as other:
                for _ in range(3):
                    assert other.post(url + "/model/stages:echo", json=one(1.0), timeout=10).status_code == 200
            elapsed = time.monotonic() - started
            assert not done.is_set() and elapsed < 1.5  # answered while the slow stage still runs
            slow.join(10)


# ---------------------------------------------------------------- 9: load shedding


def test_requests_waiting_for_a_thread_count_toward_the_limit(servers):
    with own_server(servers, threads=2, max_enqueued_requests=4, inline_max_ms=0) as url:
        def call(_):
            started = time.monotonic()
            r = requests.post(url + "/model/stages:nap", json=one(0.6), timeout=20)
            return r, time.monotonic() - started

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        shed = [(r, t) for r, t in results if r.status_code == 503]
        served = [r for r, _ in results if r.status_code == 200]
        assert len(served) >= 4 and len(shed) >= 4
        for r, took in shed:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error_msg"].startswith("Serving Error: enqueued requests count exceeds the limit 4")
            assert took < 0.6  # answered at once, not after queueing behind the slow ones


# ------------------------------------------------------------------- 10: smaller ones


def test_a_chunked_body_in_small_chunks_within_the_limit_is_served(servers):
    with own_server(servers, max_msg_mb_size=1) as url:
        # 1 MB of payload (the limit is 1 MiB), 1.4 MB with the framing of 16-byte chunks.
        instance = {"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]], "note": "n" * 260}
        body = json.dumps({"instances": [instance] * 3000})
        assert 1_000_000 < len(body) < 1 << 20
        r = requests.post(url + ADD, data=(body[i:i + 16].encode() for i in range(0, len(body), 16)), timeout=60)
        assert r.status_code == 200 and len(r.json()["instances"]) == 3000


def test_a_servable_with_a_non_ascii_name_is_callable(servers):
    r = post(servers.http, "/model/数字:echo", one(2.0))
    assert r.status_code == 200, r.text
    assert r.json() == {"instances": [{"y": 2.0}]}
    r = post(servers.http, "/model/数字:nope", one(2.0))
    assert r.status_code == 404 and "数字" in r.text


def test_nan_outputs_are_an_error_not_null(servers):
    r = post(servers.http, "/model/stages:nan", one(1.0))
    assert r.status_code == 400  # the values, not the server: in practice the inputs took the model there
    assert "nan" in r.json()["error_msg"] and "index [1]" in r.json()["error_msg"]
    assert "null" not in r.text


# ------------------------------------------------------------------- the start options


def test_mserve_start_options_reach_the_server():
    from mserve.cli.render import CliError
    from mserve.cli.settings import StartSettings

    flags = {"max_instances": 7, "max_connections": 500, "idle_timeout": 5, "header_timeout": 2.5,
             "handshake_timeout": 3, "max_header_kb": 16}
    options = StartSettings.build(None, flags).restful_options()
    assert {k: options[k] for k in ("max_instances_per_request", "max_connections", "idle_timeout", "header_timeout",
                                    "handshake_timeout", "max_header_kb")} == {
        "max_instances_per_request": 7, "max_connections": 500, "idle_timeout": 5.0, "header_timeout": 2.5,
        "handshake_timeout": 3.0, "max_header_kb": 16}
    with pytest.raises(CliError, match="header_timeout must be > 0"):
        StartSettings.build(None, {"header_timeout": 0})
    with pytest.raises(RuntimeError, match="max_connections=100000000 needs"):
        server.start_restful_server("127.0.0.1:0", max_connections=100_000_000, additional=True)
