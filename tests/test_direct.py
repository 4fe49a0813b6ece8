"""Simple keep-alive predicts are answered straight from the bytes read
(`mserve.transport.direct`); every other shape of request still goes through
Waitress, and both give the same reply. Real sockets, the real server."""

from __future__ import annotations

import re
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import pytest

from mserve import server
from support import write_servable

CONFIG = """
import threading
import time

from mserve import register


def name(x):
    return threading.current_thread().name


def nap(x):
    time.sleep(float(x))
    return threading.current_thread().name


@register.register_method(output_names=["thread"])
def who(x):
    return register.add_stage(name, x, outputs_count=1)


@register.register_method(output_names=["thread"])
def nap_for(x):
    return register.add_stage(nap, x, outputs_count=1)
"""

BODY = b'{"instances": [{"x": 0}]}'


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    write_servable(root, "who", CONFIG)
    (root / "who" / "1").mkdir()
    return root


@contextmanager
def started(root, **restful) -> Iterator[tuple[str, int, object]]:
    try:
        server.start_servables(server.ServableStartConfig(root, "who"))
        restful.setdefault("additional", True)
        # Generous, so that a loaded test machine's slow runs of these quick methods
        # still count as quick: what is tested is the lane, not the policy's limit.
        restful.setdefault("inline_max_ms", 50)
        restful_server = server.start_restful_server("127.0.0.1:0", **restful)
        host, port = restful_server.url.removeprefix("http://").split(":")
        yield host, int(port), restful_server.transport
    finally:
        server.stop()


def post(path: str, body: bytes = BODY, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), version, extra, len(body), body))


def read_replies(conn: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """``count`` complete replies (head, body) from ``conn``."""
    data, replies = b"", []
    while len(replies) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            length = int(re.search(rb"(?i)content-length: *(\d+)", data[:end]).group(1))
            if len(data) >= end + 4 + length:
                replies.append((data[:end], data[end + 4 : end + 4 + length]))
                data = data[end + 4 + length :]
                continue
        chunk = conn.recv(65536)
        assert chunk, (replies, data)
        data += chunk
    return replies


def warm(conn: socket.socket, path: str = "/model/who:who", times: int = 8) -> None:
    """Enough requests for the inline policy to know the path is quick."""
    for _ in range(times):
        conn.sendall(post(path))
        read_replies(conn, 1)


def header_names(head: bytes) -> list[bytes]:
    return [line.split(b":", 1)[0] for line in head.split(b"\r\n")[1:]]


def test_a_simple_predict_is_answered_from_the_read_with_waitress_s_reply_head(root):
    with started(root) as (host, port, transport), socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(post("/model/who:who"))
        (waitress_head, waitress_body), = read_replies(conn, 1)  # unknown cost yet: Waitress's path
        warm(conn)
        before = transport.direct_requests
        conn.sendall(post("/model/who:who", extra=b"X-Request-ID: trace-42\r\n"))
        (head, body), = read_replies(conn, 1)
        assert transport.direct_requests == before + 1
        assert body == b'{"instances":[{"thread":"mserve-http"}]}'
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nX-Request-Id: trace-42" in head
        # The same headers, in the same order, as Waitress's own reply.
        assert header_names(head) == header_names(waitress_head)
        assert header_names(head) == [b"Content-Length", b"Content-Type", b"Date", b"Server", b"X-Request-Id"]
        conn.sendall(post("/model/who:who"))  # and the connection stays open for more
        assert read_replies(conn, 1)[0][1] == body


@pytest.mark.parametrize("shape, wire", [
    ("HTTP/1.0", post("/model/who:who", version=b"HTTP/1.0", extra=b"Connection: keep-alive\r\n")),
    ("percent-encoded path", post("/model/%77ho:who")),
    ("chunked body", b"POST /model/who:who HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)),
    ("two requests in one write", post("/model/who:who") * 2),
    ("a folded header", post("/model/who:who", extra=b"X-Note: a\r\n b\r\n")),
])
def test_other_request_shapes_go_through_waitress_and_are_answered_alike(root, shape, wire):
    with started(root) as (host, port, transport), socket.create_connection((host, port), timeout=10) as conn:
        warm(conn)
        before = transport.direct_requests
        conn.sendall(wire)
        replies = read_replies(conn, wire.count(b"POST "))
        for head, body in replies:
            assert head.split(b"\r\n")[0].endswith(b" 200 OK"), head
            assert body == b'{"instances":[{"thread":"mserve-http"}]}', body
        assert transport.direct_requests == before, shape


def test_a_request_split_over_two_writes_is_answered(root):
    with started(root) as (host, port, transport), socket.create_connection((host, port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        warm(conn)
        wire = post("/model/who:who")
        conn.sendall(wire[:40])
        time.sleep(0.05)
        conn.sendall(wire[40:])
        (head, body), = read_replies(conn, 1)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"mserve-http" in body


def test_connection_close_is_honoured(root):
    with started(root) as (host, port, transport), socket.create_connection((host, port), timeout=10) as conn:
        warm(conn)
        conn.sendall(post("/model/who:who", extra=b"Connection: close\r\n"))
        (head, body), = read_replies(conn, 1)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"mserve-http" in body
        assert conn.recv(1) == b""  # the server closed it after the reply


def test_a_direct_predict_past_its_deadline_gets_the_504_and_others_are_served_meanwhile(root):
    """A quick path turns slow on the I/O thread: the loop moves to a fresh thread
    (the other connection is served), the deadline reply goes out at the deadline,
    with Connection: close, and the late reply is dropped."""
    with started(root, request_timeout=0.5) as (host, port, transport), \
            socket.create_connection((host, port), timeout=10) as slow, \
            socket.create_connection((host, port), timeout=10) as other:
        warm(slow, "/model/who:nap_for")
        before = transport.direct_requests
        asked = time.monotonic()
        slow.sendall(post("/model/who:nap_for", b'{"instances": [{"x": 1.5}]}'))
        time.sleep(0.2)
        other.sendall(post("/model/who:who"))
        (head, body), = read_replies(other, 1)
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        (head, body), = read_replies(slow, 1)
        assert 0.4 < time.monotonic() - asked < 1.4
        assert head.startswith(b"HTTP/1.1 504"), head
        assert b"Connection: close" in head
        assert transport.direct_requests >= before + 1
        slow.settimeout(3)
        assert slow.recv(65536) == b""  # closed once the late reply was dropped


def test_a_stop_waits_for_a_direct_predict_still_running_and_sends_its_reply(root):
    """The stop's drain must not take a connection whose direct predict is still
    running (on the stalled I/O thread) for an idle one."""
    import threading

    with started(root) as (host, port, transport), socket.create_connection((host, port), timeout=10) as conn:
        warm(conn, "/model/who:nap_for")
        before = transport.direct_requests
        conn.sendall(post("/model/who:nap_for", b'{"instances": [{"x": 1.0}]}'))
        time.sleep(0.3)  # running: the loop has moved to a fresh thread meanwhile
        assert transport.direct_requests == before + 1
        stopping = threading.Thread(target=transport.stop, kwargs={"drain_timeout": 10})
        stopping.start()
        (head, body), = read_replies(conn, 1)
        stopping.join(15)
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        assert body == b'{"instances":[{"thread":"mserve-http"}]}'
