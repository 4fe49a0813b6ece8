"""The MindIR backend, a real MindSpore plugin found through mserve's entry point.

Each test exports a MindIR with MindSpore itself, serves it through a real mserve
server over HTTP, and compares the replies with the same graph run by MindSpore
directly. Skipped when the extra is not installed:

    .venv/bin/pip install -e '.[test,mindspore]'
    .venv/bin/python -m pytest tests/test_mindspore_backend.py -q
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

ms = pytest.importorskip("mindspore")
from mindspore import Tensor, nn, ops  # noqa: E402

from mserve import server  # noqa: E402
from mserve.backends import find_backend, installed_backends  # noqa: E402
from mserve.errors import ServableLoadError  # noqa: E402
from support import serving, write_servable  # noqa: E402

KEY = b"0123456789abcdef0123456789abcdef"

ADD_CONFIG = """
from mserve import register

model = register.declare_model(model_file="tensor_add.mindir", model_format="MindIR", with_batch_dim=False)


@register.register_method(output_names=["y"])
def add_common(x1, x2):
    y = register.add_stage(model, x1, x2, outputs_count=1)
    return y
"""

LENET_CONFIG = """
from mserve import register

model = register.declare_model(model_file="lenet.mindir", model_format="MindIR")


@register.register_method(output_names=["logits"])
def predict(image):
    return register.add_stage(model, image, outputs_count=1)
"""


class Add(nn.Cell):
    def construct(self, x, y):
        return ops.add(x, y)


class LeNet5(nn.Cell):
    """The LeNet-5 of MindSpore's tutorials: 32x32 grey images, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, pad_mode="valid")
        self.conv2 = nn.Conv2d(6, 16, 5, pad_mode="valid")
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Dense(16 * 5 * 5, 120)
        self.fc2 = nn.Dense(120, 84)
        self.fc3 = nn.Dense(84, 10)

    def construct(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.flatten(x)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def export_mindir(net: nn.Cell, path: Path, *inputs: Tensor, enc_key: bytes | None = None,
                  enc_mode: str = "AES-GCM") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if enc_key is None else {"enc_key": enc_key, "enc_mode": enc_mode}
    ms.export(net, *inputs, file_name=str(path.with_suffix("")), file_format="MINDIR", **extra)
    return path


def run_directly(path: Path, *arrays: np.ndarray, **load_kwargs) -> np.ndarray:
    return nn.GraphCell(ms.load(str(path), **load_kwargs))(*[Tensor(a) for a in arrays]).asnumpy()


@pytest.fixture(scope="module")
def add_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mindir_add")
    folder = write_servable(root, "add", ADD_CONFIG)
    two = Tensor(np.ones((2, 2), np.float32))
    export_mindir(Add(), folder / "1" / "tensor_add.mindir", two, two)
    return root


@pytest.fixture(scope="module")
def lenet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mindir_lenet")
    folder = write_servable(root, "lenet", LENET_CONFIG)
    ms.set_seed(7)
    free_batch = Tensor(shape=[None, 1, 32, 32], dtype=ms.float32)
    export_mindir(LeNet5(), folder / "1" / "lenet.mindir", free_batch)
    return root


def test_the_backend_comes_from_the_entry_point():
    backend = next(b for b in installed_backends() if b.name == "mindspore")
    assert backend.load.__module__ == "mserve.backends.mindspore"
    assert backend.can_decrypt and backend.available()
    assert find_backend("mindir", "ascend")[0] is backend  # format names are case-insensitive
    assert find_backend("MindIR", None) == (backend, "cpu")  # MindSpore's own default device here


def test_mindir_add_served_over_http_matches_mindspore(add_dir):
    x1 = np.array([[1.5, 2.0], [3.0, -4.0]], np.float32)
    x2 = np.array([[0.25, 2.0], [30.0, 4.0]], np.float32)
    direct = run_directly(add_dir / "add" / "1" / "tensor_add.mindir", x1, x2)
    with serving(server.ServableStartConfig(add_dir, "add", device_type="CPU")) as url:
        body = {"instances": [{"x1": x1.tolist(), "x2": x2.tolist()}, {"x1": x2.tolist(), "x2": x2.tolist()}]}
        reply = requests.post(url + "/model/add:add_common", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        ys = [np.array(i["y"], np.float32) for i in reply.json()["instances"]]
        np.testing.assert_array_equal(ys[0], direct)
        np.testing.assert_array_equal(ys[1], x2 + x2)
        # Shapes and dtypes come from the MindIR graph: a wrong shape fails that instance.
        wrong = requests.post(url + "/model/add:add_common",
                              json={"instances": [{"x1": [1.0, 2.0], "x2": [1.0, 2.0]}]}, timeout=30)
        assert "size 8 not match the size 16 defined in model" in wrong.json()["error_msg"]
        described = requests.get(url + "/model/add", timeout=30).json()
        (model,) = described["versions"][0]["models"]
        assert (model["backend"], model["device_type"], model["instances"]) == ("mindspore", "cpu", [["cpu:0"]])
        assert model["inputs"] == ["float32[2,2]", "float32[2,2]"]


def test_lenet_class_network_batches_across_requests(lenet_dir):
    """A free batch dimension in the MindIR: instances of concurrent requests are
    stacked into one MindSpore call (padded to a bucket), answers as MindSpore's."""
    rng = np.random.default_rng(3)
    images = rng.standard_normal((12, 1, 32, 32)).astype(np.float32)
    direct = run_directly(lenet_dir / "lenet" / "1" / "lenet.mindir", images)
    config = server.ServableStartConfig(lenet_dir, "lenet", max_batch_size=8, max_batch_delay_ms=20)
    with serving(config) as url:
        replies: dict[int, list] = {}

        def post(start: int) -> None:
            body = {"instances": [{"image": images[i].tolist()} for i in range(start, start + 3)]}
            replies[start] = requests.post(url + "/model/lenet:predict", json=body, timeout=60).json()["instances"]

        threads = [threading.Thread(target=post, args=(s,)) for s in (0, 3, 6, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = np.array([out["logits"] for s in (0, 3, 6, 9) for out in replies[s]], np.float32)
        np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-5)
        stage = next(iter(server.registry().servables()["lenet"].versions[1].stages.values()))
        assert stage.buckets == [1, 2, 4, 8]
        assert stage.runtimes[0].compile_count == 4  # every bucket run at warm-up, nothing after


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
def test_encrypted_mindir_needs_its_key(tmp_path, mode):
    folder = write_servable(tmp_path, "add", ADD_CONFIG)
    two = Tensor(np.ones((2, 2), np.float32))
    path = export_mindir(Add(), folder / "1" / "tensor_add.mindir", two, two, enc_key=KEY, enc_mode=mode)
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    direct = run_directly(path, x, x, dec_key=KEY, dec_mode=mode)

    with pytest.raises(ServableLoadError, match="dec_key"):
        server.start_servables(server.ServableStartConfig(tmp_path, "add"))
    server.stop()
    with pytest.raises(ServableLoadError, match="decrypt"):
        server.start_servables(server.ServableStartConfig(tmp_path, "add", dec_key=b"F" * 32, dec_mode=mode))
    server.stop()

    with serving(server.ServableStartConfig(tmp_path, "add", dec_key=KEY, dec_mode=mode)) as url:
        reply = requests.post(url + "/model/add:add_common", json={"instances": [{"x1": x.tolist(), "x2": x.tolist()}]},
                              timeout=30)
        assert reply.json() == {"instances": [{"y": direct.tolist()}]}


ASCEND_SCRIPT = """
from mserve import server
try:
    server.start_servables(server.ServableStartConfig({root!r}, "add", device_type="Ascend"))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_ascend_without_an_npu_is_a_clear_load_error(add_dir):
    """This machine's MindSpore is a CPU build: asking for Ascend names the cause.
    (A fresh process: MindSpore binds a process to its first device.)"""
    out = subprocess.run([sys.executable, "-c", ASCEND_SCRIPT.format(root=str(add_dir))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("ServableLoadError servable 'add' version 1: model tensor_add.mindir (MindIR)"), line
    assert "MindSpore cannot use Ascend device 0" in line and "Unsupported device target Ascend" in line


def test_one_process_stays_on_its_first_device(add_dir):
    with serving(server.ServableStartConfig(add_dir, "add")):
        pass  # binds this process's MindSpore to the CPU
    with pytest.raises(ServableLoadError, match="binds a process to one device, so ascend:1 needs its own"):
        server.start_servables(server.ServableStartConfig(add_dir, "add", device_type="ascend", device_ids=1))
    server.stop()


class Sub(nn.Cell):
    def construct(self, x, y):
        return ops.sub(x, y)


def test_a_model_of_several_files_loads_each_as_a_subgraph(tmp_path):
    """MindSpore Serving's multi-graph model: ``model_file=[a, b]``; the first graph
    serves add_stage, every graph is there for ``Model.call(subgraph=i)``."""
    folder = write_servable(tmp_path, "multi", ADD_CONFIG.replace(
        'model_file="tensor_add.mindir"', 'model_file=["tensor_add.mindir", "tensor_sub.mindir"]'))
    two = Tensor(np.ones((2, 2), np.float32))
    export_mindir(Add(), folder / "1" / "tensor_add.mindir", two, two)
    export_mindir(Sub(), folder / "1" / "tensor_sub.mindir", two, two)
    x1 = np.array([[5.0, 6.0], [7.0, 8.0]], np.float32)
    x2 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    with serving(server.ServableStartConfig(tmp_path, "multi")) as url:
        reply = requests.post(url + "/model/multi:add_common",
                              json={"instances": [{"x1": x1.tolist(), "x2": x2.tolist()}]}, timeout=30)
        assert reply.json() == {"instances": [{"y": (x1 + x2).tolist()}]}
        loaded = server.registry().servables()["multi"].versions[1]
        (model,) = loaded.definition.models
        assert loaded.subgraph_count(model) == 2
        ((difference,),) = loaded.subgraph_stages[(model.index, 1)].run([(x1, x2)])
        np.testing.assert_array_equal(difference, x1 - x2)
