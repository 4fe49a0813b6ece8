"""mserve's own gRPC server (`mserve.transport.grpc_h2`), through grpcio's client and
through raw HTTP/2 frames: where calls run (the event loop or the threads), flow
control for messages larger than the windows, compression, metadata, the message
size limit, cancelled and expired calls, what a broken or hostile client gets (a
GOAWAY naming what was wrong, and the server keeps serving), the connection and
call limits, and the drain at stop.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import grpc
import hpack
import numpy as np
import pytest

from support import BUNDLED, write_servable

from mserve import server
from mserve.protocol import http2 as h2
from mserve.protocol import ms_service_pb2 as pb
from mserve.protocol import ms_service_pb2_grpc as pb_grpc
from mserve.serving.dataplane import Dataplane
from mserve.transport.grpc_h2 import H2GrpcTransport
from mserve.transport.grpc_limits import GrpcLimits

PREDICT = "/mindspore.serving.proto.MSService/Predict"
X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)

CONFIG = """
import threading
import time
import numpy as np
from mserve import register

def thread_name(x):
    return threading.current_thread().name

def wait(x):
    time.sleep(float(np.asarray(x).reshape(-1)[0]))
    return x

def same(x):
    return x

@register.register_method(output_names=["name"])
def where(x):
    return register.add_stage(thread_name, x, outputs_count=1)

@register.register_method(output_names=["y"])
def sleep(x):
    return register.add_stage(wait, x, outputs_count=1)

@register.register_method(output_names=["y"])
def echo(x):
    return register.add_stage(same, x, outputs_count=1)
"""


def tensor(array: np.ndarray) -> pb.Tensor:
    t = pb.Tensor(dtype=pb.MS_FLOAT32, data=np.asarray(array, np.float32).tobytes())
    t.shape.dims.extend(np.shape(array))
    return t


def request(name: str, method: str, **inputs: np.ndarray) -> pb.PredictRequest:
    req = pb.PredictRequest()
    req.servable_spec.name, req.servable_spec.method_name = name, method
    item = req.instances.add()
    for key, value in inputs.items():
        item.items[key].CopyFrom(tensor(value))
    return req


def output(reply: pb.PredictReply, name: str) -> bytes:
    assert not reply.error_msg, reply.error_msg
    item = reply.instances[0].items[name]
    return item.bytes_val[0] if item.dtype == pb.MS_STRING else item.data


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    write_servable(root, "probe", CONFIG, {"1/.keep": b""})
    try:
        server.start_servables([server.ServableStartConfig(BUNDLED, "add"), server.ServableStartConfig(root, "probe")])
        # A generous inline limit: a loaded test machine must not make quick methods look slow.
        main = server.start_grpc_server("127.0.0.1:0", inline_max_ms=50)
        small = server.start_grpc_server("127.0.0.1:0", max_msg_mb_size=1, additional=True)
        assert isinstance(main, H2GrpcTransport) and isinstance(small, H2GrpcTransport)
        channel = grpc.insecure_channel(main.target)
        yield {"target": main.target, "small": small.target, "stub": pb_grpc.MSServiceStub(channel)}
        channel.close()
    finally:
        server.stop()


def own_transport(**limits) -> H2GrpcTransport:
    """A second server on the loaded servables, with limits of its own (stopped by the test)."""
    runtime = server.default_runtime()
    inline_max_ms = limits.pop("inline_max_ms", 0)
    transport = H2GrpcTransport(Dataplane(runtime.registry), "127.0.0.1:0", runtime.readiness,
                                limits=GrpcLimits(**limits), inline_max_ms=inline_max_ms, threads=4)
    transport.start()
    return transport


# ------------------------------------------------------------------ a raw HTTP/2 client


class RawClient:
    """HTTP/2 frames by hand, for what no well-behaved client sends."""

    def __init__(self, target: str, preface: bool = True):
        host, port = target.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.inbox = b""
        if preface:
            self.send(h2.PREFACE + h2.settings_frame({}))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def headers(self, stream: int, path: str = PREDICT, end_stream: bool = False, extra: tuple = ()) -> bytes:
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "test"), ("content-type", "application/grpc"), ("te", "trailers"),
                                     *extra])
        return h2.frame(h2.HEADERS, h2.END_HEADERS | (h2.END_STREAM if end_stream else 0), stream, block)

    @staticmethod
    def message(stream: int, payload: bytes, end_stream: bool = True) -> bytes:
        return h2.frame(h2.DATA, h2.END_STREAM if end_stream else 0, stream, h2.message_prefix(len(payload)) + payload)

    def frames(self, until, timeout: float = 10.0) -> list[tuple[int, int, int, bytes]]:
        """Frames read until ``until(frames)`` holds or the server closes the connection."""
        seen: list[tuple[int, int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while not until(seen):
            while len(self.inbox) >= 9:
                length, kind, flags, stream = h2.read_head(self.inbox, 0)
                if len(self.inbox) < 9 + length:
                    break
                seen.append((kind, flags, stream, self.inbox[9: 9 + length]))
                self.inbox = self.inbox[9 + length:]
                if until(seen):
                    return seen
            if time.monotonic() >= deadline:
                return seen  # the caller's assertion says what was missing
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                seen.append((-1, 0, 0, b""))  # the server closed the connection
                return seen
            self.inbox += data
        return seen

    def status(self, fields_frames: list) -> dict[str, str]:
        """Every header field the server sent, decoded (trailers included)."""
        fields: dict[str, str] = {}
        for kind, _, _, payload in fields_frames:
            if kind == h2.HEADERS:
                for name, value in self.decoder.decode(payload):
                    fields[name] = value
        return fields

    def close(self) -> None:
        self.sock.close()


def goaway(frames: list) -> tuple[int, str] | None:
    for kind, _, _, payload in frames:
        if kind == h2.GOAWAY:
            return int.from_bytes(payload[4:8], "big"), payload[8:].decode()
    return None


def closed_or_goaway(frames: list) -> bool:
    return any(kind in (h2.GOAWAY, -1) for kind, *_ in frames)


def ended(stream: int):
    return lambda frames: any(s == stream and (kind == h2.RST_STREAM or (kind == h2.HEADERS and flags & h2.END_STREAM))
                              for kind, flags, s, _ in frames) or any(kind == -1 for kind, *_ in frames)


def still_serves(served) -> None:
    reply = served["stub"].Predict(request("add", "add_common", x1=X, x2=X), timeout=10)
    assert output(reply, "y") == (X + X).tobytes()


# ------------------------------------------------------------------ through grpcio's client


def test_quick_calls_move_onto_the_event_loop_and_blocking_ones_leave_it(served):
    stub = served["stub"]
    names = [output(stub.Predict(request("probe", "where", x=X), timeout=10), "name").decode() for _ in range(12)]
    # The first calls of a path run in the threads while the policy learns its cost; then on the loop.
    assert names[0].startswith("mserve-grpc_"), names
    assert names[-1] == "mserve-grpc-loop", names
    # A method that blocks (sleeps 120 ms, no CPU: over twice the limit of 50 ms, and past the
    # 100 ms a call may hold the loop) is sent back to the threads after one call on the loop.
    sleepy = request("probe", "sleep", x=np.full((1,), 0.12))
    for _ in range(6):
        stub.Predict(sleepy, timeout=10)
    # While a slow call runs, the loop still answers others at once.
    slow = threading.Thread(target=stub.Predict, args=(request("probe", "sleep", x=np.full((1,), 1.0)),),
                            kwargs={"timeout": 10})
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    still_serves(served)
    assert time.monotonic() - started < 0.8
    slow.join()


def test_messages_larger_than_the_flow_control_windows(served):
    # 3 MB each way (under grpcio's 4 MB default): over the client's and the server's initial
    # windows (64 KiB, 1 MiB) and the frame sizes, so both sides must give window back as they read.
    big = np.arange(750_000, dtype=np.float32)
    reply = served["stub"].Predict(request("probe", "echo", x=big), timeout=30)
    assert output(reply, "y") == big.tobytes()


def test_compressed_requests_are_read(served):
    channel = grpc.insecure_channel(served["target"], compression=grpc.Compression.Gzip)
    stub = pb_grpc.MSServiceStub(channel)
    for _ in range(3):
        assert output(stub.Predict(request("add", "add_common", x1=X, x2=X), timeout=10), "y") == (X + X).tobytes()
    channel.close()


def test_request_id_and_binary_metadata(served):
    reply, call = served["stub"].Predict.with_call(
        request("add", "add_common", x1=X, x2=X), metadata=(("x-request-id", "h2-test-1"), ("trace-bin", b"\0\1\2")),
        timeout=10)
    assert output(reply, "y") == (X + X).tobytes()
    assert ("x-request-id", "h2-test-1") in call.trailing_metadata()


def test_a_message_over_the_limit_is_refused_and_the_connection_goes_on(served):
    channel = grpc.insecure_channel(served["small"])
    stub = pb_grpc.MSServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(request("probe", "echo", x=np.zeros(400_000, np.float32)), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in refused.value.details()
    assert output(stub.Predict(request("add", "add_common", x1=X, x2=X), timeout=10), "y") == (X + X).tobytes()
    channel.close()


def test_unknown_methods_are_unimplemented(served):
    channel = grpc.insecure_channel(served["target"])
    with pytest.raises(grpc.RpcError) as missing:
        channel.unary_unary("/no.Such/Method")(b"", timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_an_expired_call_does_not_stop_the_server(served):
    with pytest.raises(grpc.RpcError) as late:
        served["stub"].Predict(request("probe", "sleep", x=np.full((1,), 0.5)), timeout=0.1)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    still_serves(served)


# ------------------------------------------------------------------ raw frames


def test_a_client_that_does_not_speak_http2_gets_a_goaway(served):
    raw = RawClient(served["target"], preface=False)
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    frames = raw.frames(closed_or_goaway)
    code, text = goaway(frames) or (None, "")
    assert code == h2.PROTOCOL_ERROR and "preface" in text
    raw.close()
    still_serves(served)


@pytest.mark.parametrize("bad, code, says", [
    (h2.frame(h2.HEADERS, h2.END_HEADERS, 2, b"\x82"), h2.PROTOCOL_ERROR, "HEADERS on stream 2"),
    (h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff"), h2.COMPRESSION_ERROR, "does not decode"),
    (h2.frame(h2.DATA, 0, 0, b"x"), h2.PROTOCOL_ERROR, "DATA on stream 0"),
    (h2.frame(h2.PING, 0, 0, b"short"), h2.PROTOCOL_ERROR, "PING"),
    (h2.frame(h2.SETTINGS, 0, 0, b"12345"), h2.FRAME_SIZE_ERROR, "SETTINGS"),
    (h2.frame(h2.PUSH_PROMISE, h2.END_HEADERS, 1, b"\0\0\0\2"), h2.PROTOCOL_ERROR, "PUSH_PROMISE"),
    (h2.frame(h2.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), h2.PROTOCOL_ERROR, "WINDOW_UPDATE of 0"),
])
def test_broken_frames_end_the_connection_with_a_goaway_that_says_why(served, bad, code, says):
    raw = RawClient(served["target"])
    raw.send(bad)
    frames = raw.frames(closed_or_goaway)
    assert goaway(frames) is not None, frames
    got_code, text = goaway(frames)
    assert (got_code, says in text) == (code, True), text
    raw.close()
    still_serves(served)


def test_an_endless_header_block_is_cut_off(served):
    raw = RawClient(served["target"])
    try:
        raw.send(h2.frame(h2.HEADERS, 0, 1, b"\x82"))
        for _ in range(70):  # 70 x 1 KB, never END_HEADERS
            raw.send(h2.frame(h2.CONTINUATION, 0, 1, b"\x40\x01a\x01b" * 200))
    except OSError:
        pass  # the server closed the connection before all of it was sent
    frames = raw.frames(closed_or_goaway)
    assert goaway(frames)[0] == h2.ENHANCE_YOUR_CALM
    raw.close()


def test_ping_is_answered_and_a_raw_call_gets_its_reply_and_trailers(served):
    raw = RawClient(served["target"])
    raw.send(h2.frame(h2.PING, 0, 0, b"12345678"))
    pong = raw.frames(lambda f: any(k == h2.PING for k, *_ in f))
    assert any(k == h2.PING and fl & h2.ACK and p == b"12345678" for k, fl, _, p in pong)
    message = request("add", "add_common", x1=X, x2=X).SerializeToString()
    raw.send(raw.headers(1) + raw.message(1, message))
    frames = raw.frames(ended(1))
    fields = raw.status(frames)
    assert fields["grpc-status"] == "0" and fields[":status"] == "200"
    data = b"".join(p for k, _, s, p in frames if k == h2.DATA and s == 1)
    assert output(pb.PredictReply.FromString(data[5:]), "y") == (X + X).tobytes()
    raw.close()


@pytest.mark.parametrize("frames_of, status, says", [
    (lambda raw: raw.headers(1, end_stream=True), "13", "no request message"),
    (lambda raw: raw.headers(1) + raw.message(1, b"a", end_stream=False) + raw.message(1, b"b"), "13", "more than one"),
    (lambda raw: raw.headers(1, extra=(("grpc-encoding", "snappy"),)) + raw.message(1, b""), "12", "snappy"),
    (lambda raw: raw.headers(1) + raw.message(1, b"\xff\xff\xff"), "13", "does not parse"),
    (lambda raw: raw.headers(1, extra=(("big", "v" * 20000),)) + raw.message(1, b""), "8", "metadata"),
])
def test_a_bad_call_gets_a_grpc_status_naming_what_was_wrong(served, frames_of, status, says):
    raw = RawClient(served["target"])
    raw.send(frames_of(raw))
    fields = raw.status(raw.frames(ended(1)))
    assert fields.get("grpc-status") == status and says in fields.get("grpc-message", ""), fields
    raw.close()
    still_serves(served)


def test_random_frames_never_stop_the_server(served):
    rng = random.Random(7)
    for _ in range(60):
        raw = RawClient(served["target"])
        junk = b"".join(h2.frame(rng.randrange(12), rng.randrange(256), rng.randrange(6),
                                 rng.randbytes(rng.randrange(40))) for _ in range(rng.randrange(1, 6)))
        try:
            raw.send(junk)
            raw.frames(closed_or_goaway, timeout=0.2)  # a frame it may ignore leaves the connection open
        except OSError:
            pass
        raw.close()
    still_serves(served)


# ------------------------------------------------------------------ limits and stop


def test_calls_per_connection_past_the_limit_are_refused(served):
    transport = own_transport(max_streams_per_connection=2)
    try:
        raw = RawClient(transport.target)
        raw.send(raw.headers(1) + raw.headers(3) + raw.headers(5))  # three open calls, none finished
        frames = raw.frames(lambda f: any(k == h2.RST_STREAM for k, *_ in f))
        assert [(s, int.from_bytes(p, "big")) for k, _, s, p in frames if k == h2.RST_STREAM] == [
            (5, h2.REFUSED_STREAM)]
        raw.close()
    finally:
        transport.stop(1)


def test_calls_past_max_calls_get_resource_exhausted(served):
    transport = own_transport(max_calls=1)
    channel = grpc.insecure_channel(transport.target)
    stub = pb_grpc.MSServiceStub(channel)
    try:
        slow = threading.Thread(target=stub.Predict, args=(request("probe", "sleep", x=np.full((1,), 1.0)),),
                                kwargs={"timeout": 10})
        slow.start()
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request("add", "add_common", x1=X, x2=X), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow.join()
    finally:
        channel.close()
        transport.stop(1)


def test_connections_past_the_limit_are_closed_and_idle_ones_get_a_goaway(served):
    transport = own_transport(max_connections=1, idle_timeout=0.5)
    try:
        first = RawClient(transport.target)
        second = RawClient(transport.target)
        assert second.frames(closed_or_goaway, timeout=5)[-1][0] == -1  # closed at once
        frames = first.frames(closed_or_goaway, timeout=5)  # idle for 0.5 s: a GOAWAY, then closed
        assert goaway(frames) == (h2.NO_ERROR, "idle")
        first.close()
        second.close()
    finally:
        transport.stop(1)


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones(served):
    transport = own_transport()
    channel = grpc.insecure_channel(transport.target)
    stub = pb_grpc.MSServiceStub(channel)
    results = []
    slow = threading.Thread(target=lambda: results.append(
        stub.Predict(request("probe", "sleep", x=np.full((1,), 0.8)), timeout=10)))
    slow.start()
    time.sleep(0.3)
    transport.stop(drain_timeout=5)
    slow.join()
    assert output(results[0], "y") == np.full((1,), 0.8, np.float32).tobytes()  # answered during the drain
    with pytest.raises(grpc.RpcError) as after:
        stub.Predict(request("add", "add_common", x1=X, x2=X), timeout=5)
    assert after.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_a_call_that_stalls_the_event_loop_gets_the_loop_moved_to_a_new_thread(served, caplog):
    transport = own_transport(inline_max_ms=50)
    # Two connections (channels in one process share one unless each has its own subchannel pool).
    stalled_channel, other_channel = (grpc.insecure_channel(transport.target, options=[("grpc.use_local_subchannel_pool", 1)])
                                      for _ in range(2))
    stalled, other = pb_grpc.MSServiceStub(stalled_channel), pb_grpc.MSServiceStub(other_channel)
    try:
        quick = request("probe", "sleep", x=np.zeros((1,)))
        for _ in range(8):  # the path is learnt as quick: its calls now run on the loop
            stalled.Predict(quick, timeout=10)
        other.Predict(request("add", "add_common", x1=X, x2=X), timeout=10)
        results = []
        slow = threading.Thread(target=lambda: results.append(
            stalled.Predict(request("probe", "sleep", x=np.full((1,), 1.5)), timeout=10)))
        slow.start()
        time.sleep(0.4)  # the slow call holds the loop thread by now; the watchdog moved the loop
        started = time.monotonic()
        assert output(other.Predict(request("add", "add_common", x1=X, x2=X), timeout=10), "y") == (X + X).tobytes()
        assert time.monotonic() - started < 0.6
        slow.join()
        assert output(results[0], "y") == np.full((1,), 1.5, np.float32).tobytes()
        # The stalled connection was handed back to the loop: it goes on serving.
        assert output(stalled.Predict(request("add", "add_common", x1=X, x2=X), timeout=10), "y") == (X + X).tobytes()
        assert "the loop moved to a new thread" in caplog.text
    finally:
        stalled_channel.close()
        other_channel.close()
        transport.stop(1)
