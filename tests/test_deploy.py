"""deploy/kserve: the KServe ServingRuntime and InferenceService examples.

Checked two ways: against the kserve SDK's model classes (generated from KServe's CRD
schemas; every field must be one the class knows, of the type it declares, and the
required ones present; `kserve_schema_check.py`, in a process of its own), and by running the runtime's container command as written,
in the default process mode (front-ends and a device process), on free ports: the
probes' paths and ports answer, and both protocols serve on the one HTTP port.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from support import BUNDLED, REPO, free_port

DEPLOY = REPO / "deploy" / "kserve"
CHECK = Path(__file__).with_name("kserve_schema_check.py")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def check(*files_and_kinds: str) -> dict[str, Any]:
    if importlib.util.find_spec("kserve") is None:  # found, not imported: see the script
        pytest.skip("the kserve SDK is not installed (pip install -e '.[test]')")
    done = subprocess.run([sys.executable, str(CHECK), *files_and_kinds], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_serving_runtime_and_inference_service_fit_kserve_schemas(tmp_path):
    result = check(str(DEPLOY / "servingruntime.yaml"), "V1alpha1ServingRuntime",
                   str(DEPLOY / "inferenceservice.yaml"), "V1beta1InferenceService")
    assert result["problems"] == []
    runtime, service = result["summary"]["V1alpha1ServingRuntime"], result["summary"]["V1beta1InferenceService"]
    assert service["runtime"] == runtime["name"] and service["format"] in runtime["formats"]
    assert service["protocol"] == "v2" and "v2" in runtime["protocols"]
    # The check does see a misspelled field.
    bad = load("servingruntime.yaml")
    bad["spec"]["containers"][0]["readinesProbe"] = bad["spec"]["containers"][0].pop("readinessProbe")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    problems = check(str(tmp_path / "bad.yaml"), "V1alpha1ServingRuntime")["problems"]
    assert len(problems) == 1 and "readinesProbe" in problems[0]


def test_the_runtime_container_serves_both_protocols_and_its_probes(tmp_path):
    container = load("servingruntime.yaml")["spec"]["containers"][0]
    port, health = container["ports"][0]["containerPort"], container["readinessProbe"]["httpGet"]["port"]
    assert container["livenessProbe"]["httpGet"]["port"] == health
    shutil.copytree(BUNDLED / "add", tmp_path / "add", ignore=shutil.ignore_patterns("__pycache__"))
    free = {str(port): str(free_port()), str(health): str(free_port())}
    args = [str(tmp_path) if a == "/mnt/models" else free.get(a, a) for a in container["args"]]
    args = [a if a != "0.0.0.0" else "127.0.0.1" for a in args]  # the test's server stays local
    grpc_port = free_port()
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"]}, "NO_COLOR": "1"}
    env.pop("MSERVE_PROCESSES", None)  # the default: front-end processes and a device process
    log = open(tmp_path / "server.log", "w+b")
    command = [sys.executable, "-m", "mserve.cli", *container["command"][1:], *args, "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url, probes = f"http://127.0.0.1:{free[str(port)]}", f"http://127.0.0.1:{free[str(health)]}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.seek(0) or log.read().decode()
            try:
                if requests.get(probes + container["readinessProbe"]["httpGet"]["path"], timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.seek(0) or log.read().decode()
            time.sleep(0.2)
        assert requests.get(probes + container["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
        x = [[1.0, 2.0], [3.0, 4.0]]
        ms = requests.post(url + "/model/add:add_common", json={"instances": [{"x1": x, "x2": x}]}, timeout=10)
        assert ms.json()["instances"][0]["y"] == [[2.0, 4.0], [6.0, 8.0]]
        thttp = pytest.importorskip("tritonclient.http",
                                    reason="tritonclient is not installed (pip install -e '.[test]')")

        client = thttp.InferenceServerClient(url.split("//")[1])
        assert client.is_server_ready() and client.is_model_ready("add.add_common")
        metadata = client.get_model_metadata("add.add_common")  # described by a front-end
        assert metadata["inputs"][0] == {"name": "x1", "datatype": "FP32", "shape": [2, 2]}
        arrays = [np.array(x, np.float32), np.array(x, np.float32) * 2]
        inputs = []
        for name, array in zip(("x1", "x2"), arrays):
            inputs.append(thttp.InferInput(name, [2, 2], "FP32"))
            inputs[-1].set_data_from_numpy(array)
        for _ in range(6):  # several requests: they reach both front-ends
            np.testing.assert_array_equal(client.infer("add.add_common", inputs).as_numpy("y"), arrays[0] * 3)
        import grpc

        from mserve.protocol import oip_v2_pb2 as pb

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=pb.ModelInferRequest.SerializeToString,
                                        response_deserializer=pb.ModelInferResponse.FromString)
            request = pb.ModelInferRequest(model_name="add.add_common")
            for name, array in zip(("x1", "x2"), arrays):
                request.inputs.add(name=name, datatype="FP32", shape=[2, 2])
                request.raw_input_contents.append(array.tobytes())
            reply = infer(request, timeout=30)
        np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 2), arrays[0] * 3)
        metrics = requests.get(url + load("servingruntime.yaml")["spec"]["annotations"]["prometheus.kserve.io/path"],
                               timeout=10).text
        assert 'method="add_common"' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
