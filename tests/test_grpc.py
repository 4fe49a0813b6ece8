"""The gRPC server seen through a raw stub built from the .proto (not `mserve.client`):
the exact reply structure of PROTOCOL.md section 5, the request checks, health,
start-up errors, and gRPC beside REST in one process.

The first test runs its own server before the module's shared one starts (pytest runs
a file's tests in order): it watches readiness go from not loaded to ready to stopped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from support import ADD_BODY, BUNDLED, free_port, write_servable

from mserve import server
from mserve.cli.main import app as cli_app
from mserve.protocol import ms_service_pb2 as pb
from mserve.protocol import ms_service_pb2_grpc as pb_grpc
from mserve.protocol import regenerate

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
runner = CliRunner()
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SLOW_CONFIG = """
import time
import numpy as np
from mserve import register

def wait(x):
    time.sleep(float(np.asarray(x).reshape(-1)[0]))
    return x

def same(x):
    return x

def to_text(x):
    return "n=" + str(int(np.asarray(x).sum()))

def complex_out(x):
    return np.asarray(x).astype(np.complex64)

@register.register_method(output_names=["y"])
def sleep(x):
    return register.add_stage(wait, x, outputs_count=1)

@register.register_method(output_names=["y", "t"])
def both(x):
    y = register.add_stage(same, x, outputs_count=1)
    t = register.add_stage(to_text, x, outputs_count=1)
    return y, t

@register.register_method(output_names=["z"])
def bad_output(x):
    return register.add_stage(complex_out, x, outputs_count=1)
"""


def tensor(array: np.ndarray) -> pb.Tensor:
    dtypes = {np.dtype(np.float32): pb.MS_FLOAT32, np.dtype(np.float64): pb.MS_FLOAT64, np.dtype(np.int32): pb.MS_INT32}
    t = pb.Tensor(dtype=dtypes[array.dtype], data=array.tobytes())
    t.shape.dims.extend(array.shape)
    return t


def request(name: str, method: str, *instances: dict, version: int = 0) -> pb.PredictRequest:
    req = pb.PredictRequest()
    req.servable_spec.name, req.servable_spec.method_name, req.servable_spec.version_number = name, method, version
    for inst in instances:
        item = req.instances.add()
        for key, value in inst.items():
            item.items[key].CopyFrom(value if isinstance(value, pb.Tensor) else tensor(value))
    return req


def health_status(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_readiness_and_stop_closes_grpc():
    assert not server.registry().servables(), "runs before the module's server (see the module docstring)"
    try:
        started = server.start_grpc_server("127.0.0.1:0")
        channel = grpc.insecure_channel(started.target)
        # Listening, nothing loaded: /ready would be 503.
        assert health_status(channel) == NOT_SERVING
        assert health_status(channel, "mindspore.serving.proto.MSService") == NOT_SERVING
        updates = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(updates).status == NOT_SERVING
        # Predicts meanwhile: a whole-request failure saying why.
        reply = pb_grpc.MSServiceStub(channel).Predict(request("add", "add_common", {"x1": X, "x2": X}))
        assert [e.error_code for e in reply.error_msg] == [2]
        assert reply.error_msg[0].error_msg.startswith(b"Request servable(add) method(add_common) , servable is not available")
        server.start_servables(server.ServableStartConfig(BUNDLED, "add"))
        assert server.readiness()[0]
        assert health_status(channel) == SERVING
        assert next(updates).status == SERVING  # Watch streams the change
        with pytest.raises(grpc.RpcError) as unknown:
            health_status(channel, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        server.begin_shutdown()
        assert health_status(channel) == NOT_SERVING
        assert next(updates).status == NOT_SERVING
    finally:
        server.stop()
    assert {u.status for u in updates} <= {NOT_SERVING}  # and the stream ended: stop did not wait on it
    with pytest.raises(grpc.RpcError) as closed:
        pb_grpc.MSServiceStub(channel).Predict(request("add", "add_common", {"x1": X, "x2": X}), timeout=5)
    assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    write_servable(root, "slow", SLOW_CONFIG, {"1/.keep": b""})
    try:
        server.start_servables([server.ServableStartConfig(BUNDLED, "add"), server.ServableStartConfig(root, "slow")])
        rest = server.start_restful_server("127.0.0.1:0")
        grpc_server = server.start_grpc_server("127.0.0.1:0")
        tiny_queue = server.start_grpc_server("127.0.0.1:0", max_enqueued_requests=1, additional=True)
        channel = grpc.insecure_channel(grpc_server.target)
        yield {"rest": rest.url, "stub": pb_grpc.MSServiceStub(channel), "channel": channel,
               "tiny_queue": tiny_queue.target}
        channel.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stub(served):
    return served["stub"]


def test_committed_stubs_match_the_proto():
    # Whatever grpcio-tools is installed compiles the .proto files; the committed stubs
    # must describe the same messages and RPCs, and come from the pinned old generator
    # (protobuf 5.26 code, which loads on protobuf 5, 6 and 7).
    assert regenerate.problems() == []


def test_the_stub_check_sees_a_changed_proto(tmp_path):
    for path in Path(regenerate.HERE).iterdir():
        if path.suffix in (".proto", ".py"):
            shutil.copy(path, tmp_path / path.name)
    proto = tmp_path / "ms_service.proto"
    proto.write_text(proto.read_text().replace("int64 error_code = 1;", "int64 error_code = 1;\n  int64 retry = 3;"))
    assert regenerate.problems(tmp_path) == [f"{tmp_path / 'ms_service_pb2.py'} does not describe ms_service.proto as it is now"]
    stub = tmp_path / "oip_v2_pb2.py"
    stub.write_text(stub.read_text().replace("Protobuf Python Version: 5.26.1", "Protobuf Python Version: 7.35.1"))
    assert any("was not generated by grpcio-tools" in p for p in regenerate.problems(tmp_path))


def test_all_good_reply_structure(stub):
    req = request("add", "add_common", {"x1": X, "x2": X}, {"x1": X * 2, "x2": X}, version=1)
    reply = stub.Predict(req)
    assert reply.servable_spec == req.servable_spec  # echoed, version included
    assert len(reply.error_msg) == 0
    assert len(reply.instances) == 2
    for i, instance in enumerate(reply.instances):
        y = instance.items["y"]
        assert list(instance.items) == ["y"] and not instance.output_buffers
        assert (y.dtype, list(y.shape.dims), y.WhichOneof("tensor_data")) == (pb.MS_FLOAT32, [2, 2], "data")
        assert y.data == (X * (i + 1) + X).tobytes()
        assert len(y.bytes_val) == 0


def test_scalar_and_str_outputs(stub):
    reply = stub.Predict(request("slow", "both", {"x": np.array(3.0, np.float32)}))
    items = reply.instances[0].items
    assert (items["y"].dtype, list(items["y"].shape.dims), items["y"].data) == (
        pb.MS_FLOAT32, [], np.float32(3.0).tobytes()
    )
    assert (items["t"].dtype, list(items["t"].shape.dims), list(items["t"].bytes_val)) == (pb.MS_STRING, [], [b"n=3"])


def test_per_instance_failure_structure(stub):
    reply = stub.Predict(request("add", "add_common", {"x1": X, "x2": X}, {"x1": X.astype(np.float64), "x2": X},
                                 {"x1": X, "x2": X}))
    assert len(reply.instances) == 3 and len(reply.error_msg) == 3
    assert [e.error_code for e in reply.error_msg] == [0, 2, 0]
    assert reply.error_msg[0].error_msg == b"" and reply.error_msg[2].error_msg == b""
    assert reply.error_msg[1].error_msg.decode().startswith(
        "Given model input 0 size 32 not match the size 16 defined in model"
    )
    assert len(reply.instances[1].items) == 0  # the failed instance is an empty Instance
    assert reply.instances[0].items["y"].data == (X * 2).tobytes()


def test_output_the_wire_cannot_carry_fails_that_instance(stub):
    reply = stub.Predict(request("slow", "bad_output", {"x": X}))
    assert len(reply.instances) == 0 and len(reply.error_msg) == 1
    assert reply.error_msg[0].error_code == 3
    assert b"bad_output output cannot be sent: output dtype complex64 has no MindSpore Serving data type" in (
        reply.error_msg[0].error_msg
    )


@pytest.mark.parametrize(
    "servable, method, text",
    [
        ("add", "nope", "Request servable(add) method(nope) , method is not available"),
        ("nope", "add_common", "Request servable(nope) method(add_common) , servable is not available"),
    ],
)
def test_whole_request_failure_structure(stub, servable, method, text):
    req = request(servable, method, {"x1": X, "x2": X}, {"x1": X, "x2": X})
    reply = stub.Predict(req)
    assert reply.servable_spec == req.servable_spec
    assert len(reply.instances) == 0
    assert [e.error_code for e in reply.error_msg] == [2]
    assert reply.error_msg[0].error_msg.decode().startswith(text)  # MindSpore's text, then what is served


def _mutated(change) -> pb.PredictRequest:
    req = request("add", "add_common", {"x1": X, "x2": X}, {"x1": X, "x2": X})
    change(req.instances[1].items["x1"], req)
    return req


@pytest.mark.parametrize(
    "change, text",
    [
        (lambda t, r: setattr(t, "data", b"\0" * 3),
         "Instances input x1 check failed, detail: Tensor check failed: input data size 3 invalid"),
        (lambda t, r: setattr(t, "dtype", pb.MS_UNKNOWN),
         "Instances input x1 check failed, detail: Tensor check failed: input data type proto::MS_UNKNOWN invalid"),
        (lambda t, r: t.shape.dims.__setitem__(slice(None), [0, 2]),
         "Instances input x1 check failed, detail: Tensor check failed: input  shape [0, 2] invalid"),
        (lambda t, r: t.CopyFrom(pb.Tensor(dtype=pb.MS_STRING, bytes_val=[b"a"], shape=pb.TensorShape(dims=[1, 1]))),
         "Instances input x1 check failed, detail: Instance tensor check failed: bytes or string type input  shape "
         "can only be (1,) or empty, but given shape is [1, 1]"),
        (lambda t, r: t.CopyFrom(pb.Tensor(dtype=pb.MS_BYTES, bytes_val=[b"a", b"b"])),
         "Instances input x1 check failed, detail: Instance tensor check failed: bytes or string type shape batch "
         "size can only be 1"),
        (lambda t, r: t.shm_data.CopyFrom(pb.ShmTensorData(memory_key="k", data_size=16)),
         "Instances input x1 check failed, detail: Tensor check failed: shared-memory tensors"),
        (lambda t, r: r.instances[1].output_buffers["y"].CopyFrom(pb.ShmTensorData(memory_key="k")),
         "output_buffers (shared-memory outputs) are not supported by mserve"),
        (lambda t, r: r.instances[1].items.pop("x2"),
         "Cannot find input x2 in instance input , servable add, method add_common"),
        (lambda t, r: r.ClearField("instances"),
         "Instances count of request cannot be 0, servable: add, method: add_common"),
    ],
)
def test_a_bad_instance_fails_the_whole_request(stub, change, text):
    reply = stub.Predict(_mutated(change))
    assert len(reply.instances) == 0 and len(reply.error_msg) == 1
    assert reply.error_msg[0].error_code == 2
    assert reply.error_msg[0].error_msg.decode().startswith(text)


def test_queue_full_is_a_whole_request_failure(served):
    stub = pb_grpc.MSServiceStub(grpc.insecure_channel(served["tiny_queue"]))
    refused = None
    for _ in range(3):  # the slow call itself is refused if it lands while a probe is inside: again
        slow = stub.Predict.future(request("slow", "sleep", {"x": np.array([1.0], np.float32)}))
        time.sleep(0.2)
        while refused is None and not slow.done():  # probe while the slow call holds the only place
            reply = stub.Predict(request("add", "add_common", {"x1": X, "x2": X}))
            refused = reply if reply.error_msg else None
            time.sleep(0.01)
        if refused is not None:
            break
    assert refused is not None, slow.result()
    assert [e.error_code for e in refused.error_msg] == [1] and len(refused.instances) == 0
    assert refused.error_msg[0].error_msg.startswith(b"Serving Error: enqueued requests count exceeds the limit 1")
    assert len(slow.result().instances) == 1


def test_rest_and_grpc_side_by_side_with_metrics_log_and_request_id(served, stub, caplog):
    assert requests.post(served["rest"] + "/model/add:add_common", json=ADD_BODY, timeout=10).status_code == 200
    with caplog.at_level(logging.INFO, logger="mserve.access"):
        reply, call = stub.Predict.with_call(
            request("add", "add_common", {"x1": X, "x2": X}), metadata=(("x-request-id", "grpc-abc-123"),)
        )
    assert len(reply.instances) == 1
    assert ("x-request-id", "grpc-abc-123") in call.trailing_metadata()
    records = [r for r in caplog.records if r.name == "mserve.access"]
    assert [(r.http_method, r.path, r.status, r.request_id) for r in records] == [
        ("gRPC", "/model/add:add_common", 200, "grpc-abc-123")
    ]
    metrics = requests.get(served["rest"] + "/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith("mserve_requests_total{")
               and 'servable="add"' in line and 'status="200"' in line]
    assert counted and float(counted[0].split()[-1]) >= 2  # the REST predict and the gRPC ones


# ------------------------------------------------------------------ start-up errors


def test_start_errors_are_serving_errors(tmp_path):
    running = len(server.default_runtime().transports)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(RuntimeError, match=rf"^Serving Error: .*address 127.0.0.1:{port}: Address already in use"):
            server.start_grpc_server(f"127.0.0.1:{port}", additional=True)
    finally:
        taken.close()
    cases = {
        "127.0.0.1": "Serving Error: The format of the Serving gRPC address '127.0.0.1' is illegal",
        "127.0.0.1:": "Serving Error: Missing ip or port of the Serving gRPC address '127.0.0.1:'",
        "127.0.0.1:http": "Serving Error: The type of Serving gRPC address '127.0.0.1:http' port is not a number",
        "127.0.0.1:70000": "Serving Error: The port of the Serving gRPC address '127.0.0.1:70000' is out of legal range",
        "unix:": "Serving Error: Empty grpc server unix domain socket address",
        f"unix:{tmp_path}/missing/s.sock": f"the directory {tmp_path}/missing of the unix domain socket",
    }
    for address, text in cases.items():
        with pytest.raises(RuntimeError) as raised:
            server.start_grpc_server(address, additional=True)
        assert text in str(raised.value)
    (tmp_path / "file.sock").write_text("not a socket")
    with pytest.raises(RuntimeError, match=r"^Serving Error: .*file.sock of address .* is not a socket"):
        server.start_grpc_server(f"unix:{tmp_path}/file.sock", additional=True)
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen()
    try:  # grpcio would silently take the path over from the server listening there
        with pytest.raises(RuntimeError, match=r"^Serving Error: .*live.sock' is in use: a server answers on"):
            server.start_grpc_server(f"unix:{tmp_path}/live.sock", additional=True)
    finally:
        live.close()
    for size in (0, 513, True, 1.5):
        with pytest.raises(RuntimeError, match="Parameter 'max_msg_mb_size'"):
            server.start_grpc_server("127.0.0.1:0", max_msg_mb_size=size, additional=True)
    ca = trustme.CA()
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    mismatched = server.SSLConfig(str(tmp_path / "server.pem"), str(tmp_path / "other.key"))
    with pytest.raises(RuntimeError, match=r"^Serving Error: .*the private key does not match the certificate"):
        server.start_grpc_server("127.0.0.1:0", ssl_config=mismatched, additional=True)
    missing = server.SSLConfig(str(tmp_path / "none.pem"), str(tmp_path / "other.key"))
    with pytest.raises(RuntimeError, match=r"^Serving Error: .*load certificate from .*none.pem failed"):
        server.start_grpc_server("127.0.0.1:0", ssl_config=missing, additional=True)
    with pytest.raises(RuntimeError, match="The type of ssl_config should be type of SSLConfig"):
        server.start_grpc_server("127.0.0.1:0", ssl_config={"certificate": "x"}, additional=True)
    assert len(server.default_runtime().transports) == running  # nothing half-started was left behind


def test_relative_unix_socket_path(served, tmp_path, monkeypatch):
    """``unix:relative.sock`` is relative to the current directory, as in MindSpore."""
    monkeypatch.chdir(tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind("relative.sock")  # left behind by a server that is gone: replaced
    stale.close()
    started = server.start_grpc_server("unix:relative.sock", additional=True)  # stopped with the module's server
    assert started.target == "unix:relative.sock"
    assert (tmp_path / "relative.sock").is_socket()
    channel = grpc.insecure_channel(f"unix:{tmp_path}/relative.sock")
    assert health_status(channel) == SERVING
    reply = pb_grpc.MSServiceStub(channel).Predict(request("add", "add_common", {"x1": X, "x2": X}))
    assert reply.instances[0].items["y"].data == (X * 2).tobytes()
    channel.close()


# ------------------------------------------------------------------ the command line

WHOAMI_CONFIG = """
import os
import numpy as np
from mserve import register

def pid(x):
    return np.int64(os.getpid())

@register.register_method(output_names=["pid"])
def who(x):
    return register.add_stage(pid, x, outputs_count=1)
"""


def _mserve() -> list[str]:
    mserve = Path(sys.executable).with_name("mserve")
    return [str(mserve)] if mserve.exists() else [sys.executable, "-m", "mserve.cli"]


def _start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, err = cwd / "start.out", cwd / "start.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([*_mserve(), "start", *args], cwd=cwd, stdout=o, stderr=e, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.monotonic() + 120
    while "serving on" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"mserve start did not come up:\n{err.read_text()}")
        time.sleep(0.1)
    return proc, out, err


def test_cli_start_grpc_port_from_yaml_and_invoke_over_grpc(tmp_path):
    grpc_port = free_port()
    (tmp_path / "serve.yaml").write_text(f"grpc_port: {grpc_port}\nservables: [add]\n")
    proc, out, err = _start(["-c", "serve.yaml", "--port", str(free_port())], tmp_path)
    try:
        banner = out.read_text()
        assert f"and gRPC 127.0.0.1:{grpc_port}" in banner
        assert f"gRPC: Client('127.0.0.1:{grpc_port}', SERVABLE, METHOD)" in banner
        inputs = ["-i", "x1=[[1.0,2.0],[3.0,4.0]]", "-i", "x2=[[5.0,6.0],[7.0,8.0]]"]
        shown = runner.invoke(cli_app, ["invoke", "add:add_common", *inputs, "--url", f"grpc://127.0.0.1:{grpc_port}"])
        assert shown.exit_code == 0, shown.output
        assert "[[6.0, 8.0], [10.0, 12.0]]" in shown.stdout
        as_json = runner.invoke(
            cli_app, ["invoke", "add:add_common", *inputs, "-n", "2", "--grpc", "--url", f"127.0.0.1:{grpc_port}", "--json"]
        )
        assert as_json.exit_code == 0, as_json.output
        assert json.loads(as_json.stdout) == {"instances": [{"y": [[6.0, 8.0], [10.0, 12.0]]}] * 2}
        # JSON integers are int32, as over REST: the float32 model refuses them, whole request.
        ints = runner.invoke(cli_app, ["invoke", "add:add_common", "-i", "x1=[[1,2],[3,4]]", "-i", "x2=[[1,2],[3,4]]",
                                       "--url", f"grpc://127.0.0.1:{grpc_port}"])
        assert ints.exit_code == 2 and "gRPC: Given model input 0 data type kMSI_Int32 not match" in ints.stderr
        unknown = runner.invoke(cli_app, ["invoke", "add:nope", *inputs, "--url", f"grpc://127.0.0.1:{grpc_port}"])
        assert unknown.exit_code == 2 and "method is not available" in unknown.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err.read_text()
    assert "gRPC /model/add:add_common 200" in err.read_text()


def _grpc_pids(port: int, tries: int = 40) -> set[int]:
    """The pids answering ``whoami`` over ``tries`` new connections (a channel each,
    not shared with other channels, so each one is a new TCP connection)."""
    pids = set()
    for _ in range(tries):
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = pb_grpc.MSServiceStub(channel).Predict(request("whoami", "who", {"x": X}), timeout=30)
        assert not reply.error_msg, reply.error_msg
        pids.add(int(np.frombuffer(reply.instances[0].items["pid"].data, np.int64)[0]))
        if len(pids) >= 2:
            break
    return pids


def test_cli_grpc_beside_frontends_is_served_by_frontends_sharing_the_port(tmp_path):
    """With front-end processes (the default architecture), gRPC is served by
    front-ends of its own, every one bound to the gRPC port with SO_REUSEPORT: new
    connections reach different front-ends, never the server's own process."""
    write_servable(tmp_path, "whoami", WHOAMI_CONFIG, {"1/.keep": b""})
    grpc_port, port = free_port(), free_port()
    proc, out, err = _start([str(tmp_path), "--port", str(port), "--grpc-port", str(grpc_port), "--workers", "2"],
                            tmp_path)
    try:
        assert f"and gRPC 127.0.0.1:{grpc_port}" in out.read_text()
        pids = _grpc_pids(grpc_port)
        assert len(pids) == 2 and proc.pid not in pids, pids
        rest = requests.post(f"http://127.0.0.1:{port}/model/whoami:who", json={"instances": [{"x": 1.0}]}, timeout=30)
        assert rest.status_code == 200, rest.text
        assert rest.json()["instances"][0]["pid"] not in pids | {proc.pid}  # REST's front-ends are others
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert health_status(channel) == SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err.read_text()


GRPC_FIRST_SCRIPT = """
import os, sys, time
from mserve import server

server.start_grpc_server("127.0.0.1:{grpc_port}")
print("GRPC STARTED", flush=True)
while not os.path.exists({gate!r}):
    time.sleep(0.05)
server.start_servables(server.ServableStartConfig({root!r}, "whoami"))
server.start_restful_server("127.0.0.1:{port}")
print("MAIN RETURNED", flush=True)
"""


def test_grpc_started_first_in_devices_mode_health_then_frontends(tmp_path):
    """A start script in the default (devices) mode that starts gRPC before loading
    and before REST, as MindSpore's scripts do: gRPC front-ends answer health
    NOT_SERVING until the device processes serve, then SERVING, and predicts from
    several front-ends (not the script's process); SIGTERM exits 0."""
    write_servable(tmp_path, "whoami", WHOAMI_CONFIG, {"1/.keep": b""})
    grpc_port, port = free_port(), free_port()
    gate = tmp_path / "load-now"
    script = tmp_path / "serving_server.py"
    script.write_text(GRPC_FIRST_SCRIPT.format(grpc_port=grpc_port, port=port, gate=str(gate), root=str(tmp_path)))
    log = tmp_path / "script.out"
    env = {**os.environ, "MSERVE_PROCESSES": "devices", "MSERVE_WORKERS": "2"}
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, env=env)

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 300  # a hang guard on a busy machine, not a timing
        while text not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

    try:
        wait_for("GRPC STARTED")
        for _ in range(4):  # every front-end: nothing is loaded yet
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert health_status(ch) == NOT_SERVING
                assert health_status(ch, "mindspore.serving.proto.MSService") == NOT_SERVING
        gate.touch()
        wait_for("MAIN RETURNED")
        for _ in range(4):
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert health_status(ch) == SERVING
        pids = _grpc_pids(grpc_port)
        assert len(pids) == 2 and proc.pid not in pids, pids
        rest = requests.post(f"http://127.0.0.1:{port}/model/whoami:who", json={"instances": [{"x": 1.0}]}, timeout=30)
        assert rest.status_code == 200, rest.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_cli_grpc_port_errors(tmp_path):
    result = runner.invoke(cli_app, ["start", "--grpc-port", "70000"])
    assert result.exit_code == 2 and "grpc_port 70000 is out of range" in result.stderr
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:  # a subprocess: a start that fails stops the whole server API, this module's server too
        done = subprocess.run(
            [*_mserve(), "start", "--servable", "add", "--port", "0", "--grpc-port", str(taken.getsockname()[1])],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
    finally:
        taken.close()
    assert done.returncode == 1 and "Serving Error: Serving gRPC server start failed" in done.stderr, done.stderr
