"""Big and hostile request bodies against a real in-process server (the bundled add
servable): refused cheaply, named clearly, their memory given back.

Memory is measured with tracemalloc (Python and numpy allocations of this process,
server threads included), not wall-clock time.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

import numpy as np
import pytest
import requests

from mserve import server
from support import BUNDLED, serving

pytestmark = pytest.mark.timeout(300)

X = "[[1.0, 2.0], [3.0, 4.0]]"


@pytest.fixture(scope="module")
def url():
    with serving(server.ServableStartConfig(BUNDLED, "add"), max_instances_per_request=100) as base:
        yield base


def post_raw(url: str, path: str, body: str | bytes) -> requests.Response:
    return requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=120)


def test_a_repeated_instances_key_is_refused_by_name(url):
    body = '{"instances": [{"x1": %s, "x2": %s}], "instances": [{"x1": %s, "x2": %s}]}' % (X, X, X, X)
    r = post_raw(url, "/model/add:add_common", body)
    assert r.status_code == 400
    assert r.json() == {"error_msg": "Parser request failed, key 'instances' expects to exist once, but actually 2 times"}


def test_a_repeated_input_key_is_refused_by_name(url):
    r = post_raw(url, "/model/add:add_common", '{"instances": [{"x1": %s, "x2": %s, "x1": %s}]}' % (X, X, X))
    assert r.status_code == 400
    assert "key 'x1' expects to exist once, but actually 2 times" in r.json()["error_msg"]


def test_a_key_named_in_a_value_is_not_a_repeat(url):
    body = '{"instances": [{"x1": %s, "x2": %s, "note": "\\"x1\\" twice: \\"x1\\""}]}' % (X, X)
    r = post_raw(url, "/model/add:add_common", body)
    assert r.status_code == 200, r.text


def test_an_infinity_from_client_values_is_a_400_naming_it(url):
    big = "[[3e38, 2.0], [3.0, 4.0]]"
    r = post_raw(url, "/model/add:add_common", '{"instances": [{"x1": %s, "x2": %s}]}' % (big, big))
    assert r.status_code == 400, r.text
    assert "has no JSON form" in r.json()["error_msg"] and "inf" in r.json()["error_msg"]


def test_a_body_over_the_instance_limit_is_refused_before_it_is_built(url):
    instances = 400_000  # 12 MB of JSON: as Python objects, several hundred MB
    body = ('{"instances": [' + ",".join(['{"x1": [[1.0]], "x2": [[1.0]]}'] * instances) + "]}").encode()
    gc.collect()
    tracemalloc.start()
    try:
        r = post_raw(url, "/model/add:add_common", body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status_code == 413, r.text
    assert f"the request has {instances} instances, more than the limit 100" in r.json()["error_msg"]
    assert peak < 5 * len(body), f"{peak / 2**20:.0f} MB allocated for a {len(body) / 2**20:.0f} MB body"


def test_a_big_request_that_fails_leaves_no_memory_behind(url):
    side = 700  # two 700x700 tensors (~2 MB of JSON each), refused by the 2x2 model
    tensor = "[" + ",".join(["[" + ",".join(["1.5"] * side) + "]"] * side) + "]"
    body = '{"instances": [{"x1": %s, "x2": %s}]}' % (tensor, tensor)
    gc.collect()
    tracemalloc.start()
    try:
        held = []
        for _ in range(3):
            r = post_raw(url, "/model/add:add_cast", body)
            assert r.status_code >= 400 and "error_msg" in r.json()
            time.sleep(0.6)  # the collection after a big failure is rate-limited
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert max(held) < 3 * 2**20, [f"{h / 2**20:.1f} MB" for h in held]


def test_a_grpc_tensor_of_65_dimensions_is_a_clean_error():
    import grpc

    from mserve.protocol import ms_service_pb2 as pb
    from mserve.protocol import ms_service_pb2_grpc as pb_grpc

    server.start_servables(server.ServableStartConfig(BUNDLED, "add"))
    try:
        started = server.start_grpc_server("127.0.0.1:0")
        req = pb.PredictRequest()
        req.servable_spec.name, req.servable_spec.method_name = "add", "add_common"
        item = req.instances.add()
        for name in ("x1", "x2"):
            t = pb.Tensor(dtype=pb.MS_FLOAT32, data=np.ones(1, np.float32).tobytes())
            t.shape.dims.extend([1] * 65)
            item.items[name].CopyFrom(t)
        with grpc.insecure_channel(started.target) as channel:
            reply = pb_grpc.MSServiceStub(channel).Predict(req, timeout=30)
        messages = [e.error_msg for e in reply.error_msg]
        assert messages and "65 dimensions" in messages[0].decode(), messages
    finally:
        server.stop()
