"""`mserve.client` against a real mserve gRPC server: MindSpore Serving's client semantics.

One process serves the bundled add servable and a small servable of value kinds
over gRPC on a TCP port, a unix socket, one-way TLS, mutual TLS and a 1 MB message
limit (trustme certificates). The last test runs MindSpore Serving 2.0.2's own
client (``/tmp/msserving/venv``, when that interpreter exists) against the same server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trustme

from support import BUNDLED, write_servable

from mserve import server
from mserve.client import Client, SSLConfig

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
MINDSPORE_PYTHON = Path(os.environ.get("MSS_ROOT", "/tmp/msserving")) / "venv" / "bin" / "python"

KINDS_CONFIG = """
import numpy as np
from mserve import register

def same(x):
    return x

def python_scalars(x):
    total = np.asarray(x).sum()
    return int(total), float(total), bool(total)

def shout(text):
    return text.upper() + "!"

def reverse(blob):
    return blob.tobytes()[::-1]

def positive(x):
    if np.asarray(x).min() < 0:
        raise ValueError("x must not be negative")
    return x

@register.register_method(output_names=["y"])
def echo(x):
    return register.add_stage(same, x, outputs_count=1)

@register.register_method(output_names=["i", "f", "b"])
def scalars(x):
    return register.add_stage(python_scalars, x, outputs_count=3)

@register.register_method(output_names=["text"])
def text(text):
    return register.add_stage(shout, text, outputs_count=1)

@register.register_method(output_names=["blob"])
def blob(blob):
    return register.add_stage(reverse, blob, outputs_count=1)

@register.register_method(output_names=["y"])
def check(x):
    return register.add_stage(positive, x, outputs_count=1, tag="Check")
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    issued = ca.issue_cert("127.0.0.1", "localhost")
    issued.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    issued.private_key_pem.write_to_path(str(folder / "server.key"))
    client = ca.issue_cert("client@mserve.test")
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client.key"))
    return {name: str(folder / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def grpc_servers(tmp_path_factory, certs):
    """address name -> what a client dials."""
    root = tmp_path_factory.mktemp("servables")
    write_servable(root, "kinds", KINDS_CONFIG, {"1/.keep": b""})
    socket_path = tmp_path_factory.mktemp("sock") / "mserve.sock"
    try:
        server.start_servables([server.ServableStartConfig(BUNDLED, "add"), server.ServableStartConfig(root, "kinds")])
        one_way = server.SSLConfig(certs["server.pem"], certs["server.key"])
        mutual = server.SSLConfig(certs["server.pem"], certs["server.key"], certs["ca.pem"], verify_client=True)
        yield {
            "tcp": server.start_grpc_server("127.0.0.1:0").target,
            "unix": server.start_grpc_server(f"unix:{socket_path}", additional=True).target,
            "tls": server.start_grpc_server("127.0.0.1:0", ssl_config=one_way, additional=True).target,
            "mtls": server.start_grpc_server("127.0.0.1:0", ssl_config=mutual, additional=True).target,
            "small": server.start_grpc_server("127.0.0.1:0", max_msg_mb_size=1, additional=True).target,
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def address(grpc_servers):
    return grpc_servers["tcp"]


def test_add_common_three_instances(address):
    instances = [{"x1": X, "x2": X * (i + 1)} for i in range(3)]
    result = Client(address, "add", "add_common").infer(instances)
    assert isinstance(result, list) and len(result) == 3
    for i, item in enumerate(result):
        assert list(item) == ["y"]
        assert item["y"].dtype == np.float32 and item["y"].shape == (2, 2)
        np.testing.assert_array_equal(item["y"], X + X * (i + 1))


def test_add_cast_with_int32(address):
    ones = np.ones((2, 2), np.int32)
    result = Client(address, "add", "add_cast").infer({"x1": ones, "x2": ones * 3})
    np.testing.assert_array_equal(result[0]["y"], np.full((2, 2), 4.0, np.float32))
    assert result[0]["y"].dtype == np.float32


@pytest.mark.parametrize(
    "value, dtype, shape",
    [
        (np.float16(1.5), np.float16, ()),                        # numpy scalar: 0-d, dtype kept
        (np.array([0.1, -2.5], np.float64), np.float64, (2,)),
        (np.array([[2**64 - 1], [7]], np.uint64), np.uint64, (2, 1)),
        (np.array([True, False]), np.bool_, (2,)),
        (np.int8(-3), np.int8, ()),
        (np.zeros((3, 0), np.float32), np.float32, (3, 0)),      # an empty tensor ([0, 3] is refused, as MindSpore)
        (True, np.bool_, (1,)),                                   # Python scalars: shape [1], numpy's dtype
        (7, np.int64, (1,)),
        (2.5, np.float64, (1,)),
    ],
)
def test_numeric_values_round_trip(address, value, dtype, shape):
    result = Client(address, "kinds", "echo").infer({"x": value})
    y = result[0]["y"]
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == shape
    np.testing.assert_array_equal(y, np.asarray(value).reshape(shape))


def test_str_and_bytes(address):
    assert Client(address, "kinds", "text").infer({"text": "héllo"}) == [{"text": "HÉLLO!"}]
    assert Client(address, "kinds", "blob").infer({"blob": b"\x00\x01\xff"}) == [{"blob": b"\xff\x01\x00"}]


def test_python_scalar_outputs_are_0d(address):
    result = Client(address, "kinds", "scalars").infer({"x": np.array([1, 2, 3], np.int32)})
    out = result[0]
    assert (out["i"].dtype, out["i"].shape, out["i"][()]) == (np.int64, (), 6)
    assert (out["f"].dtype, out["f"].shape, out["f"][()]) == (np.float64, (), 6.0)
    assert (out["b"].dtype, out["b"].shape, out["b"][()]) == (np.bool_, (), True)


def test_per_instance_failure(address):
    good = np.array([1.0], np.float32)
    result = Client(address, "kinds", "check").infer([{"x": good}, {"x": -good}, {"x": good * 2}])
    assert len(result) == 3
    np.testing.assert_array_equal(result[0]["y"], good)
    assert result[1] == {"error": "Check Failed: x must not be negative"}
    np.testing.assert_array_equal(result[2]["y"], good * 2)


def test_every_instance_failing_alike_is_one_error(address):
    bad = {"x1": X.astype(np.float64), "x2": X}
    result = Client(address, "add", "add_common").infer([bad, bad])
    assert list(result) == ["error"]  # one dict for the whole request, not a list
    assert result["error"].startswith("Given model input 0 size 32 not match the size 16 defined in model")


@pytest.mark.parametrize(
    "servable, method, instance, error",
    [
        ("add", "no_such_method", {"x1": X, "x2": X}, "Request servable(add) method(no_such_method) , method is not available"),
        ("nothing", "add_common", {"x1": X, "x2": X}, "Request servable(nothing) method(add_common) , servable is not available"),
        ("add", "add_common", {"x1": X}, "Cannot find input x2 in instance input , servable add, method add_common"),
    ],
)
def test_whole_request_failure(address, servable, method, instance, error):
    result = Client(address, servable, method).infer(instance)
    assert list(result) == ["error"] and result["error"].startswith(error)  # MindSpore's text, then mserve's detail


def test_unknown_version_is_a_whole_request_failure(address):
    result = Client(address, "add", "add_common", version_number=9).infer({"x1": X, "x2": X})
    assert result["error"].startswith("Request servable(add) method(add_common)  version(9) , servable is not available")


def test_infer_async(address):
    client = Client(address, "add", "add_common")
    pending = [client.infer_async([{"x1": X * i, "x2": X}]) for i in range(4)]
    for i, future in enumerate(pending):
        np.testing.assert_array_equal(future.result()[0]["y"], X * i + X)
    failed = Client(address, "add", "nope").infer_async({"x1": X, "x2": X})
    assert failed.result()["error"].startswith("Request servable(add) method(nope) , method is not available")


def test_unix_socket_address(grpc_servers):
    assert grpc_servers["unix"].startswith("unix:")
    result = Client(grpc_servers["unix"], "add", "add_common").infer({"x1": X, "x2": X})
    np.testing.assert_array_equal(result[0]["y"], X * 2)


def test_tls_one_way(grpc_servers, certs):
    client = Client(grpc_servers["tls"], "add", "add_common", ssl_config=SSLConfig(custom_ca=certs["ca.pem"]))
    np.testing.assert_array_equal(client.infer({"x1": X, "x2": X})[0]["y"], X * 2)
    # A client that does not trust the server's CA (gRPC's default roots) never gets to send,
    # and neither does a plaintext one.
    for refused in (Client(grpc_servers["tls"], "add", "add_common", ssl_config=SSLConfig()),
                    Client(grpc_servers["tls"], "add", "add_common")):
        assert refused.infer({"x1": X, "x2": X})["error"].startswith("Grpc Error, (14, 'unavailable'), ")


def test_tls_mutual(grpc_servers, certs):
    with_cert = SSLConfig(certs["client.pem"], certs["client.key"], certs["ca.pem"])
    result = Client(grpc_servers["mtls"], "add", "add_common", ssl_config=with_cert).infer({"x1": X, "x2": X})
    np.testing.assert_array_equal(result[0]["y"], X * 2)


def test_tls_mutual_refuses_a_client_without_certificate(grpc_servers, certs):
    result = Client(grpc_servers["mtls"], "add", "add_common", ssl_config=SSLConfig(custom_ca=certs["ca.pem"])).infer(
        {"x1": X, "x2": X}
    )
    assert result["error"].startswith("Grpc Error, (14, 'unavailable'), ")


def test_message_over_the_server_limit(grpc_servers):
    big = np.zeros(300_000, np.float32)  # 1.2 MB > max_msg_mb_size=1
    result = Client(grpc_servers["small"], "kinds", "echo").infer({"x": big})
    assert result["error"].startswith("Grpc Error, (8, 'resource exhausted'), ")
    assert "larger than max" in result["error"]
    # The same server still answers what fits.
    small = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(Client(grpc_servers["small"], "kinds", "echo").infer({"x": small})[0]["y"], small)


def test_a_call_that_fails_returns_grpc_error(tmp_path):
    result = Client(f"unix:{tmp_path}/nobody.sock", "add", "add_common").infer({"x1": X, "x2": X})
    assert result["error"].startswith("Grpc Error, (14, 'unavailable'), ")


def test_client_argument_checks(address):
    with pytest.raises(RuntimeError, match="Parameter 'address' should be str"):
        Client(5500, "add", "add_common")
    with pytest.raises(RuntimeError, match="Parameter 'servable_name' should not be empty str"):
        Client(address, "", "add_common")
    with pytest.raises(RuntimeError, match="Parameter 'version_number' should be >= 0"):
        Client(address, "add", "add_common", version_number=-1)
    with pytest.raises(RuntimeError, match="The type of ssl_config should be type of SSLConfig"):
        Client(address, "add", "add_common", ssl_config=server.SSLConfig("a", "b"))
    with pytest.raises(RuntimeError, match="The certificate and private_key should be passed at the same time"):
        Client(address, "add", "add_common", ssl_config=SSLConfig(certificate=__file__))
    client = Client(address, "add", "add_common")
    with pytest.raises(RuntimeError, match="instance should be a map"):
        client.infer([("x1", X)])
    with pytest.raises(RuntimeError, match="Not support value type"):
        client.infer({"x1": [1.0, 2.0], "x2": X})
    with pytest.raises(RuntimeError, match="Unknown data type complex64"):
        client.infer({"x1": X.astype(np.complex64), "x2": X})


MINDSPORE_CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from mindspore_serving.client import Client

    address = sys.argv[1]
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    out = {}
    out["add3"] = [r["y"].tolist() for r in Client(address, "add", "add_common").infer([{"x1": x, "x2": x}] * 3)]
    ones = np.ones((2, 2), np.int32)
    cast = Client(address, "add", "add_cast").infer([{"x1": ones, "x2": ones}])
    out["cast"] = [str(cast[0]["y"].dtype), cast[0]["y"].tolist()]
    out["unknown"] = Client(address, "add", "nope").infer({"x1": x, "x2": x})
    partial = Client(address, "kinds", "check").infer([{"x": np.float32(1)}, {"x": np.float32(-1)}])
    out["partial"] = [partial[0]["y"].tolist(), partial[1]]
    out["text"] = Client(address, "kinds", "text").infer({"text": "abc"})
    out["blob"] = Client(address, "kinds", "blob").infer({"blob": b"ab"})[0]["blob"].decode()
    out["async"] = Client(address, "add", "add_common").infer_async({"x1": x, "x2": x}).result()[0]["y"].tolist()
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not MINDSPORE_PYTHON.exists(), reason="MindSpore Serving's client is not set up here")
def test_mindspore_serving_client_works_unchanged(address, tmp_path):
    """MindSpore Serving 2.0.2's own Python client, unmodified, against mserve."""
    script = tmp_path / "ms_client.py"
    script.write_text(MINDSPORE_CLIENT_SCRIPT)
    done = subprocess.run(
        [str(MINDSPORE_PYTHON), str(script), address], capture_output=True, text=True, timeout=90,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["add3"] == [[[2.0, 4.0], [6.0, 8.0]]] * 3
    assert out["cast"] == ["float32", [[2.0, 2.0], [2.0, 2.0]]]
    assert out["unknown"]["error"].startswith("Request servable(add) method(nope) , method is not available")
    assert out["partial"] == [1.0, {"error": "Check Failed: x must not be negative"}]
    assert out["text"] == [{"text": "ABC!"}]
    assert out["blob"] == "ba"
    assert out["async"] == [[2.0, 4.0], [6.0, 8.0]]
