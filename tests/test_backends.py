"""Model backends from outside mserve: `register_backend` and the `mserve.backends`
entry point group, with the smallest runtime the README promises (``inputs``,
``outputs``, ``predict``), on a device type JAX does not know."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import requests

from mserve import server
from mserve.backends import TensorSpec, register_backend
from support import serving, write_servable

AFFINE_CONFIG = """
from mserve import register

model = register.declare_model(model_file="affine.npz", model_format="numpy_affine", with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


class NumpyAffine:
    """y = x @ w + b in numpy: no warm_up, no compile_count (both are optional)."""

    def __init__(self, w: np.ndarray, b: np.ndarray, device: object):
        self.inputs = [TensorSpec(np.dtype(np.float32), (None, w.shape[0]))]
        self.outputs = [TensorSpec(np.dtype(np.float32), (None, w.shape[1]))]
        self.w, self.b, self.device = w, b, device
        self.batches: list[int] = []

    def predict(self, arrays):
        (x,) = arrays
        self.batches.append(len(x))
        return [x @ self.w + self.b]


@pytest.fixture
def affine_dir(tmp_path):
    folder = write_servable(tmp_path, "affine", AFFINE_CONFIG)
    (folder / "1").mkdir()
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.savez(folder / "1" / "affine.npz", w=w, b=np.array([1.0, -1.0], np.float32))
    return tmp_path


def test_registered_backend_serves_on_a_device_type_jax_does_not_know(affine_dir):
    made: list[NumpyAffine] = []

    def load(files, options, device):
        with np.load(files[0]) as data:
            made.append(NumpyAffine(data["w"], data["b"], device))
        return made[-1]

    register_backend("numpy_affine", load)
    config = server.ServableStartConfig(affine_dir, "affine", device_type="ascend", device_ids=[0, 1],
                                        max_batch_size=4)
    with serving(config) as url:
        assert [r.device for r in made] == [("ascend", 0), ("ascend", 1)]
        replies: list = []

        def post(i: float) -> None:
            body = {"instances": [{"x": [i, 1.0, 0.0]}, {"x": [0.0, 0.0, i]}]}
            replies.append((i, requests.post(url + "/model/affine:predict", json=body, timeout=10).json()))

        threads = [threading.Thread(target=post, args=(float(i),)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(replies) == 8
        for i, reply in replies:  # w = [[0, 1], [2, 3], [4, 5]], b = [1, -1]
            assert reply == {"instances": [{"y": [3.0, i + 2.0]}, {"y": [4 * i + 1, 5 * i - 1]}]}
        # Batches never exceed max_batch_size, and padding reached the runtime as rows.
        assert all(size <= 4 for r in made for size in r.batches)

        wrong = requests.post(url + "/model/affine:predict", json={"instances": [{"x": [1, 2, 3]}]}, timeout=10)
        assert wrong.json() == {"error_msg": "Given model input 0 data type int32 not match the data type float32"
                                             " defined in model (model input 0 is input 'x')"}


ENTRY_POINT_SCRIPT = """
import requests
from mserve import server

server.start_servables(server.ServableStartConfig({root!r}, "affine"))
url = server.start_restful_server("127.0.0.1:0").url
print(requests.post(url + "/model/affine:predict", json={{"instances": [{{"x": [1.0, 1.0, 1.0]}}]}}).text)
server.stop()
"""

PLUGIN = """
import numpy as np
from mserve.backends import TensorSpec


class Affine:
    def __init__(self, w, b):
        self.inputs = [TensorSpec(np.dtype(np.float32), (None, w.shape[0]))]
        self.outputs = [TensorSpec(np.dtype(np.float32), (None, w.shape[1]))]
        self.w, self.b = w, b

    def predict(self, arrays):
        return [arrays[0] @ self.w + self.b]


def load(files, options, device):
    with np.load(files[0]) as data:
        return Affine(data["w"], data["b"])
"""


def test_entry_point_backend_is_found_by_model_format(affine_dir, tmp_path):
    """An installed package announces ``numpy_affine = module:load`` in the
    ``mserve.backends`` group; mserve finds it by name. (A fresh process: entry points
    are read once per process.)"""
    site = tmp_path / "site"
    (site / "mserve_numpy_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "mserve_numpy_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "mserve_numpy_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mserve-numpy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mserve.backends]\nnumpy_affine = mserve_numpy_plugin:load\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", ENTRY_POINT_SCRIPT.format(root=str(affine_dir))],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == '{"instances":[{"y":[7.0,8.0]}]}'
