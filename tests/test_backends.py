"""Model backends: the interface (formats, device types, decryption, the load
request, releasing), the errors when nothing serves a (format, device type) pair,
and backends from outside mserve: `register_backend`, a hand-made entry point, and
the example plugin package (examples/backend_plugin) pip-installed into the venv."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from mserve import server
from mserve.backends import (
    Backend, BackendError, Device, LoadRequest, TensorSpec, check_device_type, find_backend, installed_backends,
    register_backend, unregister_backend,
)
from mserve.errors import ServableLoadError
from support import BUNDLED, serving, write_servable

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
    with _unregistered("numpy_affine"), serving(config) as url:
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
        assert wrong.json() == {"error_msg": "Given model input 0 data type kMSI_Int32 not match the data type "
                                             "kMSI_Float32 defined in model (model input 0 is input 'x': int32 given, "
                                             "float32 expected)"}


@contextlib.contextmanager
def _unregistered(name: str) -> Iterator[None]:
    """Unregister the backend afterwards, so later tests see only their own."""
    try:
        yield
    finally:
        unregister_backend(name)


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


# --------------------------------------------------------------------------- the interface

def test_a_backend_declares_its_device_types_and_gets_a_load_request(affine_dir):
    """A `Backend` for Ascend only: asked for the CPU, the error says what serves what;
    on Ascend its loader gets the whole LoadRequest."""
    requests_seen: list[LoadRequest] = []

    def load(request: LoadRequest):
        requests_seen.append(request)
        with np.load(request.files[0]) as data:
            return NumpyAffine(data["w"], data["b"], request.device)

    register_backend(Backend("affine_npu", ("numpy_affine",), ("ascend",), load))
    try:
        with pytest.raises(ServableLoadError) as failed:
            server.start_servables(server.ServableStartConfig(affine_dir, "affine", device_type="CPU"))
        server.stop()
        # MindSpore Serving's text, then mserve's reason: what is installed for which device type.
        message = str(failed.value)
        assert message.startswith("The device type 'cpu' of servable name affine is inconsistent with current "
                                  "running environment, supported device type: "), message
        assert ("(no installed backend serves model_format 'numpy_affine' on device type 'cpu'. Installed backends: "
                "affine_npu: numpy_affine on ascend;") in message, message

        config = server.ServableStartConfig(affine_dir, "affine", device_type="Ascend", device_ids=[2, 5],
                                            dec_key=None)
        with serving(config) as url:
            assert [r.devices for r in requests_seen] == [(Device("ascend", 2),), (Device("ascend", 5),)]
            assert all(r.dec_key is None and r.config_file is None for r in requests_seen)
            assert requests_seen[0].files[0].name == "affine.npz"
            described = requests.get(url + "/model/affine", timeout=10).json()["versions"][0]["models"][0]
            assert (described["backend"], described["device_type"]) == ("affine_npu", "ascend")
            assert described["instances"] == [["ascend:2"], ["ascend:5"]]
    finally:
        unregister_backend("affine_npu")


def test_only_a_backend_that_decrypts_gets_the_key(affine_dir):
    seen: list[LoadRequest] = []

    def load(request: LoadRequest):
        seen.append(request)
        with np.load(request.files[0]) as data:
            return NumpyAffine(data["w"], data["b"], request.device)

    register_backend(Backend("affine_plain", ("numpy_affine",), ("cpu",), load))
    try:
        with pytest.raises(ServableLoadError, match="backend 'affine_plain' .* cannot decrypt models"):
            server.start_servables(server.ServableStartConfig(affine_dir, "affine", dec_key=b"k" * 16))
        server.stop()
        assert seen == []  # refused before the loader ran
    finally:
        unregister_backend("affine_plain")

    register_backend(Backend("affine_crypt", ("numpy_affine",), ("cpu",), load, can_decrypt=True))
    try:
        with serving(server.ServableStartConfig(affine_dir, "affine", dec_key=b"k" * 16, dec_mode="AES-CBC")):
            assert [(r.dec_key, r.dec_mode) for r in seen] == [(b"k" * 16, "AES-CBC")]
    finally:
        unregister_backend("affine_crypt")


def test_jax_backends_cannot_decrypt(tmp_path):
    with pytest.raises(ServableLoadError, match="backend 'jax_export' \\(jax_export\\) cannot decrypt"):
        server.start_servables(server.ServableStartConfig(BUNDLED, "add", dec_key=b"0" * 16))
    server.stop()


def test_a_missing_framework_names_what_to_install():
    register_backend(Backend("fake_npu", ("fake_om",), ("ascend", "fakenpu"), lambda r: None,
                             requires="mserve_no_such_framework", install="pip install mserve-fake-npu"))
    try:
        # A type only a missing framework runs on passes the start-up check; the
        # model's lookup says what to install for its format.
        assert check_device_type("FakeNPU") == "fakenpu"
        with pytest.raises(BackendError) as failed:
            find_backend("fake_om", "ascend")
        assert str(failed.value) == ("no installed backend serves model_format 'fake_om' on device type 'ascend'; "
                                     "backend 'fake_npu' serves it but is not installed: pip install mserve-fake-npu")
        assert "fake_npu: fake_om on ascend, fakenpu (not installed: pip install mserve-fake-npu)" in [
            b.summary() for b in installed_backends()]
    finally:
        unregister_backend("fake_npu")


def test_nothing_serves_jax_function_on_ascend(tmp_path):
    with pytest.raises(BackendError) as failed:
        find_backend("jax_function", "Ascend")
    message = str(failed.value)
    assert message.startswith("no installed backend serves model_format 'jax_function' on device type 'ascend'. "
                              "Installed backends: ")
    assert "jax_function: jax_function on cpu, gpu, tpu" in message
    assert "To serve it: install one (pip install 'mserve[mindspore]' (MindIR models))" in message


def test_an_unknown_device_type_is_refused_before_loading(affine_dir):
    with pytest.raises(BackendError) as failed:
        check_device_type("npu")  # resolve_devices asks this before anything loads
    assert str(failed.value).startswith("device_type 'npu': no installed backend runs on it. Installed: ")
    assert "jax_export: jax_export on cpu, gpu, tpu" in str(failed.value)
    assert server.resolve_devices("GPU", [1]) == [Device("gpu", 1)]  # checked by the backend at load
    # End to end (main served it on the CPU): refused at start, by this check or by
    # ServableStartConfig's own (MindSpore's "Unsupported device type").
    with pytest.raises((ServableLoadError, RuntimeError), match="device_type 'npu'|device type 'npu'"):
        server.start_servables(server.ServableStartConfig(affine_dir, "affine", device_type="npu"))
    server.stop()
    assert server.resolve_devices(None, [0, 2]) == [Device(None, 0), Device(None, 2)]  # each backend's default


def test_jax_device_ids_are_checked_by_the_backend(tmp_path):
    with pytest.raises(ServableLoadError, match="device id 7 does not exist: 1 cpu device"):
        server.start_servables(server.ServableStartConfig(BUNDLED, "add", device_type="cpu", device_ids=7))
    server.stop()


def test_releasing_a_version_closes_its_runtimes(affine_dir):
    closed: list[int] = []

    class Closing(NumpyAffine):
        def close(self) -> None:
            closed.append(self.device.id)

    def load(request: LoadRequest):
        with np.load(request.files[0]) as data:
            return Closing(data["w"], data["b"], request.device)

    register_backend(Backend("affine_closing", ("numpy_affine",), ("cpu",), load))
    try:
        with serving(server.ServableStartConfig(affine_dir, "affine", device_type="cpu", device_ids=[0, 1])):
            assert closed == []
        assert sorted(closed) == [0, 1]
    finally:
        unregister_backend("affine_closing")


# --------------------------------------------------------------------------- a plugin package

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "examples" / "backend_plugin"

PLUGIN_CONFIG = """
from mserve import register

model = register.declare_model(model_file="linear.npz", model_format="npz_linear",
                               options={"activation": "relu"})


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""

PLUGIN_SCRIPT = """
import json, sys
import requests
from mserve import server

server.start_servables(server.ServableStartConfig(sys.argv[1], "linear", device_ids=[0, 1]))
url = server.start_restful_server("127.0.0.1:0").url
reply = requests.post(url + "/model/linear:predict", json={"instances": [{"x": [1.0, 2.0]}, {"x": [-3.0, 0.5]}]})
model = requests.get(url + "/model/linear").json()["versions"][0]["models"][0]
print(json.dumps({"reply": reply.json(), "model": model}))
server.stop()
"""


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """examples/backend_plugin pip-installed into this venv (from a copy, so its
    build files stay out of the repository), uninstalled afterwards."""
    source = tmp_path_factory.mktemp("plugin") / "backend_plugin"
    shutil.copytree(PLUGIN_DIR, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Build with this venv's setuptools when it can build a wheel by itself (fast,
    # offline); else let pip fetch a build environment (Python 3.12+ venvs come
    # without setuptools, and setuptools < 70.1 needs the separate `wheel` package).
    local = all(importlib.util.find_spec(m) is not None for m in ("setuptools", "wheel"))
    isolation = ["--no-build-isolation"] if local else []
    done = subprocess.run(pip + ["install", "--no-deps", *isolation, str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    try:
        yield source
    finally:
        subprocess.run(pip + ["uninstall", "-y", "mserve-npz-linear"], capture_output=True, timeout=300)


def test_example_plugin_package_serves_through_its_entry_point(installed_plugin, tmp_path):
    folder = write_servable(tmp_path, "linear", PLUGIN_CONFIG)
    (folder / "1").mkdir()
    np.savez(folder / "1" / "linear.npz", w=np.array([[1.0, -1.0], [2.0, 0.0]], np.float32),
             b=np.array([0.5, 0.0], np.float32))
    out = subprocess.run([sys.executable, "-c", PLUGIN_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    # relu([1, 2] @ w + b) = relu([5.5, -1]); relu([-3, 0.5] @ w + b) = relu([-1.5, 3])
    assert report["reply"] == {"instances": [{"y": [5.5, 0.0]}, {"y": [0.0, 3.0]}]}
    model = report["model"]
    assert (model["backend"], model["device_type"], model["instances"]) == ("npz_linear", "cpu", [["cpu:0"], ["cpu:1"]])
    assert model["inputs"] == ["float32[?,2]"]


def test_mserve_list_shows_backend_and_devices():
    from typer.testing import CliRunner

    from mserve.cli.main import app

    result = CliRunner().invoke(app, ["list", "--servable", "add"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "runs on" in result.stdout and "jax_export on cpu:0" in result.stdout
    listed = CliRunner().invoke(app, ["list", "--servable", "add", "--json"])
    (model,) = json.loads(listed.stdout)["servables"][0]["versions"][0]["models"]
    assert {k: model[k] for k in ("backend", "device_type", "devices", "instances")} == {
        "backend": "jax_export", "device_type": "cpu", "devices": 1, "instances": [["cpu:0"]]}


def test_no_device_ids_is_a_load_error():
    with pytest.raises(ServableLoadError, match=r"model tensor_add.jaxexport \(jax_export\): no device to load it on"):
        server.start_servables(server.ServableStartConfig(BUNDLED, "add", device_ids=[]))
    server.stop()


PRECEDENCE_SCRIPT = """
import json
from mserve.backends import Backend, find_backend, installed_backends, register_backend
register_backend(Backend("mine", ("MindIR",), ("cpu",), lambda request: None))
print(json.dumps([find_backend("MindIR", "cpu")[0].name, [b.name for b in installed_backends()]]))
"""


def test_code_beats_entry_points_beat_builtins():
    """Registered in code before the entry points are read (a fresh process), a
    backend still wins; entry points (mserve's own mindspore) rank above JAX."""
    out = subprocess.run([sys.executable, "-c", PRECEDENCE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    chosen, order = json.loads(out.stdout)
    assert chosen == "mine"
    # Other installed plugins (the example package, while installed) sit among the entry points.
    assert order[0] == "mine" and order[-2:] == ["jax_function", "jax_export"] and "mindspore" in order[1:-2]


WITHOUT_MINDSPORE = """
import sys


class Hide:  # as if the extra were not installed, whether it is or not
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mindspore":
            raise ModuleNotFoundError(name)


sys.meta_path.insert(0, Hide())
from mserve import server

for name, device_type in (("add", "Ascend"), ("msadd", None)):
    try:
        server.start_servables(server.ServableStartConfig({root!r}, name, device_type=device_type))
    except Exception as exc:
        print(type(exc).__name__, exc)
"""


def test_without_the_mindspore_extra_errors_say_what_to_install(tmp_path):
    from support import BUNDLED

    shutil.copytree(BUNDLED / "add", tmp_path / "add")
    write_servable(tmp_path, "msadd", (BUNDLED / "add" / "servable_config.py").read_text().replace(
        'model_file="tensor_add.jaxexport", model_format="jax_export"',
        'model_file="tensor_add.mindir", model_format="MindIR"'), {"1/tensor_add.mindir": b"not read"})
    out = subprocess.run([sys.executable, "-c", WITHOUT_MINDSPORE.format(root=str(tmp_path))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ascend, mindir = out.stdout.strip().splitlines()[-2:]
    assert ascend.startswith("ServableLoadError The device type 'ascend' of servable name add is inconsistent "
                             "with current running environment"), ascend
    assert "(no installed backend serves model_format 'jax_export' on device type 'ascend'. " in ascend, ascend
    assert "mindspore: MindIR on cpu, gpu, ascend (not installed: pip install 'mserve[mindspore]')" in ascend
    assert mindir.startswith("ServableLoadError Servable 'msadd' has models declared by declare_model, but "
                             "parameter 'device_ids' of ServableStartConfig is not set"), mindir  # MindSpore's text
    assert mindir.endswith("(no installed backend serves model_format 'MindIR' on device type 'cpu'; backend "
                           "'mindspore' serves it but is not installed: pip install 'mserve[mindspore]')"), mindir
