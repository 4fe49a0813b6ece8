"""Sharded jax_function models: one instance spanning several devices.

The end-to-end test runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (JAX reads it when it starts,
so it cannot be set inside this process): four simulated CPU devices, a weight matrix
split over them, served by a real server and compared with the same model unsharded.
Mistakes in the declared layout are load errors, checked here in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mserve import server
from mserve.errors import ServableLoadError
from support import REPO, write_servable

CONFIG = """
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from mserve import register


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]


SHARDING = {sharding}

model = register.declare_model(
    model_file="weights.npz", model_format="jax_function",
    options={{"function": mlp, "input_specs": [("b, 16", "float32")], **({{"sharding": SHARDING}} if SHARDING else {{}}),
             **{extra}}},
)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""

MODEL_PARALLEL = '{"mesh": "model", "params": {"w1": P(None, "model"), "w2": P("model", None)}}'
# Two axes: the batch split over "data", the hidden layer over "model".
TWO_AXES = ('{"mesh": {"data": 2, "model": 2}, "params": {"w1": P(None, "model"), "w2": P("model", None)},'
            ' "inputs": [P("data")]}')


def write_mlp(root, name: str, sharding: str | None, extra: str = "{}") -> None:
    folder = write_servable(root, name, CONFIG.format(sharding=sharding or "None", extra=extra))
    (folder / "1").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "1" / "weights.npz", w1=rng.standard_normal((16, 64)).astype(np.float32) / 4,
             w2=rng.standard_normal((64, 8)).astype(np.float32) / 8, b=np.arange(8, dtype=np.float32))


SCRIPT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
import jax
import numpy as np
import requests
from mserve import server

root = sys.argv[1]
server.start_servables([
    server.ServableStartConfig(root, "plain", device_ids=0),
    server.ServableStartConfig(root, "sharded", device_ids=[0, 1, 2, 3]),
    server.ServableStartConfig(root, "two_axes", device_ids=[0, 1, 2, 3]),
])
url = server.start_restful_server("127.0.0.1:0").url
rng = np.random.default_rng(1)
xs = rng.standard_normal((24, 16)).astype(np.float32)

def post(args):
    name, start = args
    body = {"instances": [{"x": xs[i].tolist()} for i in range(start, start + 3)]}
    return requests.post(url + f"/model/{name}:predict", json=body, timeout=60).json()["instances"]

answers = {}
for name in ("plain", "sharded", "two_axes"):
    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(post, [(name, s) for s in range(0, 24, 3)]))
    answers[name] = [inst["y"] for part in parts for inst in part]

servables = server.registry().servables()
stage = servables["sharded"].versions[1].stages[0]
(runtime,) = stage.runtimes
w1 = runtime.leading[0]["w1"]
report = {
    "answers": answers,
    "instances": len(stage.runtimes),
    "runtime_devices": [str(d) for d in runtime.devices],
    "w1_shape": list(w1.shape),
    "w1_shards": sorted([[str(s.device), list(s.data.shape)] for s in w1.addressable_shards]),
    "b_shards": sorted([[str(s.device), list(s.data.shape)] for s in runtime.leading[0]["b"].addressable_shards]),
    "compiles_after": runtime.compile_count,
    "buckets": stage.buckets,
    "described": requests.get(url + "/model/sharded", timeout=30).json()["versions"][0]["models"][0],
    "plain_described": requests.get(url + "/model/plain", timeout=30).json()["versions"][0]["models"][0],
    "devices_present": len(jax.devices()),
}
try:
    server.start_servables(server.ServableStartConfig(root, "odd_batches", device_ids=[0, 1, 2, 3]))
    report["odd_batches"] = "loaded"
except Exception as exc:
    report["odd_batches"] = str(exc)
print(json.dumps(report))
server.stop()
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    write_mlp(root, "plain", None)
    write_mlp(root, "sharded", MODEL_PARALLEL)
    write_mlp(root, "two_axes", TWO_AXES, extra='{"batch_sizes": [2, 4, 8]}')
    write_mlp(root, "odd_batches", TWO_AXES)  # bucket 1 cannot split over "data"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", MSERVE_COMPILE_CACHE="0")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_instance_spans_the_four_devices(report):
    assert report["devices_present"] == 4
    assert report["instances"] == 1
    assert report["runtime_devices"] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    described = report["described"]
    assert (described["backend"], described["device_type"], described["devices"]) == ("jax_function", "cpu", 4)
    assert described["instances"] == [["cpu:0", "cpu:1", "cpu:2", "cpu:3"]]
    assert report["plain_described"]["instances"] == [["cpu:0"]]


def test_each_device_holds_a_quarter_of_the_weight(report):
    assert report["w1_shape"] == [16, 64]
    shards = report["w1_shards"]
    assert len({device for device, _ in shards}) == 4
    assert [shape for _, shape in shards] == [[16, 16]] * 4  # columns split four ways
    assert [shape for _, shape in report["b_shards"]] == [[8]] * 4  # not named: replicated


def test_sharded_answers_equal_unsharded(report):
    plain = np.array(report["answers"]["plain"], np.float32)
    assert plain.shape == (24, 8)
    np.testing.assert_allclose(np.array(report["answers"]["sharded"], np.float32), plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(report["answers"]["two_axes"], np.float32), plain, rtol=1e-5, atol=1e-5)


def test_compiled_once_per_bucket_for_the_mesh(report):
    """Batched like any model: every bucket compiled at warm-up, none on requests."""
    assert report["compiles_after"] == len(report["buckets"]) == 6  # 1, 2, 4, 8, 16, 32


def test_a_batch_split_needs_divisible_batch_sizes(report):
    assert "input 0 is split 2 ways over mesh axes ('data',) along dimension 0" in report["odd_batches"]
    assert "multiples of 2" in report["odd_batches"]


@pytest.mark.parametrize(
    "sharding, extra, expected",
    [
        ('{"mesh": {"model": 4}, "params": {"w1": P(None, "model")}}', "{}",
         "needs 4 devices, but device_ids gives 1"),
        ('{"mesh": "model", "params": {"w9": P("model")}}', "{}",
         r"sharding params \['w9'\] are not in the weights file"),
        ('{"mesh": "model", "params": {"w1": P("rows")}}', "{}", "names axis 'rows'; the mesh has \\['model'\\]"),
        ('{"mesh": "model", "params": {}, "layout": 1}', "{}", r"unknown keys \['layout'\]"),
    ],
)
def test_layout_mistakes_are_load_errors(tmp_path, sharding, extra, expected):
    write_mlp(tmp_path, "bad", sharding, extra)
    with pytest.raises(ServableLoadError, match=expected):
        server.start_servables(server.ServableStartConfig(tmp_path, "bad", device_ids=0))
    server.stop()


def test_one_device_mesh_serves(tmp_path):
    """A sharding over device_ids=0 is a one-device mesh: it loads and answers."""
    write_mlp(tmp_path, "one", MODEL_PARALLEL)
    server.start_servables(server.ServableStartConfig(tmp_path, "one", device_ids=0))
    try:
        (stage,) = server.registry().servables()["one"].versions[1].stages.values()
        rng = np.random.default_rng(0)
        w1 = rng.standard_normal((16, 64)).astype(np.float32) / 4
        w2 = rng.standard_normal((64, 8)).astype(np.float32) / 8
        x = np.ones((2, 16), np.float32)
        (y,) = stage.runtimes[0].predict([x])
        np.testing.assert_allclose(y, np.tanh(x @ w1) @ w2 + np.arange(8), rtol=1e-5, atol=1e-5)
    finally:
        server.stop()
