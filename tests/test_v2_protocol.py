"""The Open Inference Protocol (KServe v2), spoken by clients no one here wrote.

A real mserve serves the bundled ``add`` and ``lenet`` servables (and ``text``, a
Python-only servable of str and bytes, written here) on REST and gRPC; Triton's
``tritonclient.http``/``tritonclient.grpc`` and the ``kserve`` SDK's
``InferenceRESTClient``/``InferenceGRPCClient`` talk to it: health, metadata, infer
with numpy inputs (binary and JSON, every datatype, BYTES as str and bytes, FP16),
requested outputs, and errors with their HTTP statuses and gRPC codes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
# The test extra installs them (pip install -e '.[test]'); without them, say so and skip.
_MISSING = "tritonclient is not installed (pip install -e '.[test]')"
thttp = pytest.importorskip("tritonclient.http", reason=_MISSING)
tgrpc = pytest.importorskip("tritonclient.grpc", reason=_MISSING)
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

from support import BUNDLED, REPO, write_servable

from mserve import server

DIGITS = REPO / "sample_data" / "digits"
X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
TEXT_CONFIG = """
from mserve import register


def shout(text):
    return text.upper(), text.encode("utf-8") + b"\\xff"


@register.register_method(output_names=["loud", "raw"])
def shout_it(text):
    loud, raw = register.add_stage(shout, text, outputs_count=2)
    return loud, raw
"""
# Every numeric datatype, as tritonclient names it, and the numpy dtype sent.
NUMERIC = [("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
           ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
           ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    (write_servable(root, "text", TEXT_CONFIG) / "1").mkdir()
    try:
        server.start_servables([
            server.ServableStartConfig(BUNDLED, "add"),
            server.ServableStartConfig(BUNDLED, "lenet"),
            server.ServableStartConfig(root, "text"),
        ])
        rest = server.start_restful_server("127.0.0.1:0")
        grpc_server = server.start_grpc_server("127.0.0.1:0")
        yield {"url": rest.url, "http": rest.url.split("//", 1)[1], "grpc": grpc_server.target}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http_client(served):
    client = thttp.InferenceServerClient(served["http"])
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(served):
    client = tgrpc.InferenceServerClient(served["grpc"])
    yield client
    client.close()


def _digit(d: int) -> bytes:
    return (DIGITS / f"digit_{d}.png").read_bytes()


def _http_input(name, array, datatype, binary=True):
    tensor = thttp.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _grpc_input(name, array, datatype):
    tensor = tgrpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


# --------------------------------------------------------------------------- tritonclient.http


def test_http_health_and_server_metadata(http_client):
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    assert http_client.is_model_ready("add.add_common")
    assert http_client.is_model_ready("add.add_common", "1")
    assert http_client.is_model_ready("lenet")  # one method: the servable's name is enough
    assert not http_client.is_model_ready("add")  # two methods: name one
    assert not http_client.is_model_ready("add.add_common", "7")
    metadata = http_client.get_server_metadata()
    assert metadata["name"] == "mserve"
    assert "binary_tensor_data" in metadata["extensions"]


def test_http_model_metadata_has_datatypes_and_batch_dims(http_client):
    add = http_client.get_model_metadata("add.add_common")
    assert add["versions"] == ["1"]
    assert add["inputs"] == [{"name": "x1", "datatype": "FP32", "shape": [2, 2]},
                             {"name": "x2", "datatype": "FP32", "shape": [2, 2]}]
    assert add["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 2]}]
    lenet = http_client.get_model_metadata("lenet.predict", "1")
    assert [o["name"] for o in lenet["outputs"]] == ["result", "probability"]
    assert all(o["shape"][0] == -1 for o in lenet["outputs"])  # batched: -1 counts the instances


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_http_infer_add_binary_and_json(http_client, binary_in, binary_out):
    inputs = [_http_input("x1", X, "FP32", binary_in), _http_input("x2", X * 3, "FP32", binary_in)]
    outputs = [thttp.InferRequestedOutput("y", binary_data=binary_out)]
    result = http_client.infer("add.add_common", inputs, outputs=outputs, request_id="req-7")
    np.testing.assert_array_equal(result.as_numpy("y"), X * 4)
    assert result.as_numpy("y").dtype == np.float32
    response = result.get_response()
    assert response["model_name"] == "add.add_common" and response["model_version"] == "1"
    assert response["id"] == "req-7"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out


@pytest.mark.parametrize("datatype,dtype", NUMERIC)
def test_http_every_numeric_datatype(http_client, datatype, dtype):
    # add_cast casts both inputs to float32 before the model: any numeric datatype goes in.
    a, b = np.array([[1, 0], [1, 1]]).astype(dtype), np.array([[1, 1], [0, 1]]).astype(dtype)
    for binary in (True, False):
        result = http_client.infer("add.add_cast", [_http_input("x1", a, datatype, binary),
                                                    _http_input("x2", b, datatype, binary)])
        np.testing.assert_array_equal(result.as_numpy("y"), a.astype(np.float32) + b.astype(np.float32))


def test_http_bytes_images_batch_and_requested_outputs(http_client):
    images = np.array([_digit(3), _digit(7), _digit(0)], dtype=np.object_)
    result = http_client.infer("lenet", [_http_input("image", images, "BYTES")])
    np.testing.assert_array_equal(result.as_numpy("result"), [3, 7, 0])
    assert result.as_numpy("result").dtype == np.int32
    assert result.as_numpy("probability").shape == (3,)
    only = http_client.infer("lenet.predict", [_http_input("image", images[:1], "BYTES")],
                             outputs=[thttp.InferRequestedOutput("probability", binary_data=False)])
    assert only.as_numpy("result") is None
    assert 0.0 < float(only.as_numpy("probability")[0]) <= 1.0


def test_http_bytes_as_str_and_bytes(http_client, served):
    # JSON strings reach the stage as str; binary BYTES as bytes unless content_type is str.
    text = np.array(["hello"], dtype=np.object_)
    result = http_client.infer("text", [_http_input("text", text, "BYTES", binary=False)],
                               outputs=[thttp.InferRequestedOutput("loud", binary_data=False),
                                        thttp.InferRequestedOutput("raw", binary_data=True)])
    assert result.as_numpy("loud")[0] in (b"HELLO", "HELLO")
    assert result.as_numpy("raw")[0] == b"hello\xff"
    head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 9, "content_type": "str"}}],
                       "parameters": {"binary_data_output": True}}).encode()
    reply = requests.post(served["url"] + "/v2/models/text/infer", data=head + b"\x05\x00\x00\x00hello",
                          headers={"Inference-Header-Content-Length": str(len(head))}, timeout=10)
    assert reply.status_code == 200, reply.text
    length = int(reply.headers["Inference-Header-Content-Length"])
    outputs = json.loads(reply.content[:length])["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in outputs] == [9, 10]
    assert reply.content[length:] == b"\x05\x00\x00\x00HELLO" + b"\x06\x00\x00\x00hello\xff"
    # bytes that are not UTF-8 cannot be JSON: the error says to ask for binary
    refused = requests.post(served["url"] + "/v2/models/text/infer", timeout=10, json={
        "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
        "outputs": [{"name": "raw"}]})
    assert refused.status_code == 500 and "binary_data" in refused.json()["error"]


def test_http_errors_name_what_is_wrong(http_client, served):
    with pytest.raises(InferenceServerException) as err:
        http_client.infer("nope", [_http_input("x1", X, "FP32")])
    assert err.value.status() == "404" and "nope" in err.value.message() and "add.add_common" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        http_client.infer("add.add_common", [_http_input("x1", X, "FP32"), _http_input("z", X, "FP32")])
    assert err.value.status() == "400" and "x2" in err.value.message()
    with pytest.raises(InferenceServerException) as err:  # the model wants float32[2, 2]
        http_client.infer("add.add_common", [_http_input("x1", X[:1], "FP32"), _http_input("x2", X[:1], "FP32")])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException) as err:
        http_client.infer("add.add_common", [_http_input("x1", X, "FP32"), _http_input("x2", X, "FP32")],
                          outputs=[thttp.InferRequestedOutput("nope")])
    assert err.value.status() == "400" and "y" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        http_client.infer("lenet", [_http_input("image", np.array([b"not a png"], np.object_), "BYTES")])
    assert err.value.status() == "400" and "Preprocess" in err.value.message()
    # Raw HTTP: OIP's error body, real statuses, and the server still serves.
    url = served["url"]
    bad = requests.post(url + "/v2/models/add.add_common/infer", data=b"{not json", timeout=10)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]
    short = requests.post(url + "/v2/models/add.add_common/infer", timeout=10, json={
        "inputs": [{"name": "x1", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]},
                   {"name": "x2", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert short.status_code == 400 and "x1" in short.json()["error"]
    assert requests.get(url + "/v2/models/add.add_common/infer", timeout=10).status_code == 405
    assert requests.get(url + "/v2/nothing", timeout=10).status_code == 404
    assert http_client.is_server_ready()


def test_http_and_mindspore_routes_agree_and_share_metrics(served):
    url = served["url"]
    ms = requests.post(url + "/model/add:add_common", timeout=10,
                       json={"instances": [{"x1": X.tolist(), "x2": X.tolist()}]}).json()
    v2 = requests.post(url + "/v2/models/add.add_common/infer", timeout=10, json={
        "inputs": [{"name": "x1", "shape": [2, 2], "datatype": "FP32", "data": X.ravel().tolist()},
                   {"name": "x2", "shape": [2, 2], "datatype": "FP32", "data": X.ravel().tolist()}]}).json()
    assert np.array(ms["instances"][0]["y"]).ravel().tolist() == v2["outputs"][0]["data"]
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert 'servable="add"' in metrics and 'method="add_common"' in metrics


# --------------------------------------------------------------------------- tritonclient.grpc


def test_grpc_health_and_metadata(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("add.add_common")
    assert not grpc_client.is_model_ready("nope")
    assert grpc_client.get_server_metadata().name == "mserve"
    metadata = grpc_client.get_model_metadata("add.add_common", as_json=True)
    assert metadata["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("x1", "FP32", ["2", "2"]), ("x2", "FP32", ["2", "2"])]


@pytest.mark.parametrize("datatype,dtype", NUMERIC)
def test_grpc_infer_every_numeric_datatype(grpc_client, datatype, dtype):
    a, b = np.array([[1, 0], [1, 1]]).astype(dtype), np.array([[1, 1], [0, 1]]).astype(dtype)
    result = grpc_client.infer("add.add_cast", [_grpc_input("x1", a, datatype), _grpc_input("x2", b, datatype)])
    np.testing.assert_array_equal(result.as_numpy("y"), a.astype(np.float32) + b.astype(np.float32))


def test_grpc_infer_bytes_and_requested_outputs(grpc_client):
    images = np.array([_digit(1), _digit(9)], dtype=np.object_)
    result = grpc_client.infer("lenet", [_grpc_input("image", images, "BYTES")],
                               outputs=[tgrpc.InferRequestedOutput("result")], request_id="g-1")
    np.testing.assert_array_equal(result.as_numpy("result"), [1, 9])
    assert result.as_numpy("probability") is None
    assert result.get_response().id == "g-1"


def test_grpc_typed_contents_and_content_type_str(served):
    # Not tritonclient: a hand-made ModelInferRequest with typed contents, BYTES as str.
    import grpc

    from mserve.protocol import oip_v2_pb2 as pb

    with grpc.insecure_channel(served["grpc"]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="text", model_version="1")
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
        tensor.parameters["content_type"].string_param = "str"
        tensor.contents.bytes_contents.append(b"hi")
        reply = infer(request)
        assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("loud", "BYTES", [1]),
                                                                               ("raw", "BYTES", [1])]
        assert reply.raw_output_contents[0] == b"\x02\x00\x00\x00HI"
        request = pb.ModelInferRequest(model_name="add.add_cast")
        for name in ("x1", "x2"):
            request.inputs.add(name=name, datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2, 3, 4])
        reply = infer(request)
        y = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))
        np.testing.assert_array_equal(y, X * 2)


def test_grpc_errors_are_status_codes(grpc_client):
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer("nope", [_grpc_input("x1", X, "FP32")])
    assert err.value.status() == "StatusCode.NOT_FOUND" and "add.add_common" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer("add.add_common", [_grpc_input("x1", X, "FP32")])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "x2" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc_client.infer("add.add_common", [_grpc_input("x1", X, "FP32"), _grpc_input("x2", X, "FP32")],
                          model_version="9")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        grpc_client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert grpc_client.is_server_ready()


# --------------------------------------------------------------------------- kserve SDK


def test_kserve_rest_and_grpc_clients(served):
    if importlib.util.find_spec("kserve") is None:  # found, not imported: see the script
        pytest.skip("the kserve SDK is not installed (pip install -e '.[test]')")
    # In a process of their own: kserve and tritonclient.grpc cannot share one (see the script).
    script = Path(__file__).with_name("kserve_v2_client.py")
    done = subprocess.run([sys.executable, str(script), served["url"], served["grpc"], str(DIGITS / "digit_4.png")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    rest, grpc = results["rest"], results["grpc"]
    assert rest["id"] == "k-1" and rest["y"] == (X * 3).tolist()
    assert rest["digit"] == [4] and rest["live"] and rest["ready"]
    assert rest["server_ready"] and grpc["server_ready"]
    assert rest["error"].startswith("404") and "add.add_common" in rest["error"]
    assert grpc["id"] == "kg-1" and grpc["y"] == (X * 6).tolist()
    assert grpc["digit"] == [4] and grpc["outputs"] == ["result", "probability"]
    assert grpc["live"] and grpc["ready"]
    assert grpc["error"].startswith("StatusCode.NOT_FOUND")


# --------------------------------------------------------------------------- mserve CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mserve.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"})


def test_cli_invoke_and_list_over_v2(served, tmp_path):
    url = served["url"]
    done = _cli("invoke", "add.add_common", "--protocol", "v2", "--url", url, "-i", "x1=[[1,2],[3,4]]",
                "-i", "x2=[[1.5,2],[3,4]]", "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["outputs"][0]["data"] == [2.5, 4.0, 6.0, 8.0]  # JSON ints sent as the declared FP32
    done = _cli("invoke", "add:add_cast", "--protocol", "v2", "--url", url, "-i", "x1=[[1,2],[3,4]]",
                "-i", "x2=[[1,1],[1,1]]", "--output", str(tmp_path))
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), [[2, 3], [4, 5]])
    failed = _cli("invoke", "add.nope", "--protocol", "v2", "--url", url, "-i", "x1=1")
    assert failed.returncode == 2 and "404" in failed.stderr and "add.add_common" in failed.stderr
    listed = _cli("list", "--url", url, "--protocol", "v2", "--json")
    assert listed.returncode == 0, listed.stderr
    models = {m["name"]: m for m in json.loads(listed.stdout)["models"]}
    assert {"add.add_common", "add.add_cast", "lenet", "lenet.predict", "text", "text.shout_it"} <= set(models)
    assert models["add.add_common"]["inputs"][0] == {"name": "x1", "datatype": "FP32", "shape": [2, 2]}
    table = _cli("list", "--url", url, "--protocol", "v2")
    assert table.returncode == 0 and "add.add_common" in table.stdout
