"""MindSpore Serving code runs on mserve as written: its deprecated register API,
its model contexts, its input checks and error texts, its stage-output rules, its
``log`` module.

Each test loads a servable written the way MindSpore Serving's own configs and tests
write them (``from mserve.register import ...`` standing for the import swap), over
real JAX artifacts, behind a real server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests

from mserve import register, server
from mserve.errors import ServableLoadError
from support import export_to, serving, spec, write_servable


@pytest.fixture(scope="module")
def add_file(tmp_path_factory):
    """float32[2,2] + float32[2,2], exported once for the module."""
    return export_to(tmp_path_factory.mktemp("art") / "add.jaxexport", lambda a, b: a + b, spec((2, 2)), spec((2, 2)))


def post(url, path, instances):
    return requests.post(url + path, json={"instances": instances}, timeout=60).json()


X = [[1.0, 2.0], [3.0, 4.0]]


# --------------------------------------------------------------------------- the deprecated API

LEGACY_CONFIG = """
import numpy as np
from mserve import register

register.declare_servable(servable_file="add.jaxexport", model_format="jax_export", with_batch_dim=False)


def add_trans_datatype(x1, x2):
    return x1.astype(np.float32), x2.astype(np.float32)


def double(instances):
    for instance in instances:
        yield instance[0] * 2


@register.register_method(output_names=["y"])
def add_common(x1, x2):
    y = register.call_servable(x1, x2)
    return y


@register.register_method(output_names=["y"])
def add_cast(x1, x2):
    x1, x2 = register.call_preprocess(add_trans_datatype, x1, x2)
    y = register.call_servable(x1, x2)
    y = register.call_postprocess_pipeline(double, y)
    return y
"""


def test_declare_servable_and_call_stages_serve_and_warn(tmp_path, add_file, caplog):
    write_servable(tmp_path, "legacy", LEGACY_CONFIG, {"1/add.jaxexport": add_file})
    caplog.set_level(logging.WARNING, logger="mserve.register")
    with serving(server.ServableStartConfig(str(tmp_path), "legacy", device_ids=0)) as url:
        common = post(url, "/model/legacy:add_common", [{"x1": X, "x2": X}])
        cast = post(url, "/model/legacy:add_cast", [{"x1": [[1, 2], [3, 4]], "x2": [[1, 1], [1, 1]]}])
    assert common == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
    assert cast == {"instances": [{"y": [[4.0, 6.0], [8.0, 10.0]]}]}
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in ("declare_servable", "call_servable", "call_preprocess", "call_postprocess_pipeline"):
        assert f"'{name}' is deprecated" in warned


@pytest.mark.parametrize("body, text", [
    ("""
    y = register.call_servable(x1, x2)
    y = register.call_servable(x1, x2)
    return y""", "Check failed in method 'm', call_servable should not be invoked more than once"),
    ("""
    y = register.call_servable(x1, x2)
    x1, x2 = register.call_preprocess(f, x1, x2)
    return y""", "Check failed in method 'm', call_servable should be invoked after call_preprocess"),
    ("""
    if x1:
        pass
    y = register.call_servable(x1, x2)
    return y""", "complex statements such as conditions and loops are not supported in register_method when the "
                 "interface 'call_servable' is used, use 'add_stage' to replace 'call_servable'"),
    ("""
    x1, x2 = register.call_preprocess(f, x1, x2)
    return x1""", "Not find the invoke of 'call_servable'"),
])
def test_deprecated_calls_keep_mindspores_rules(tmp_path, add_file, body, text):
    config = "from mserve import register\n\n" \
             "register.declare_servable('add.jaxexport', 'jax_export', with_batch_dim=False)\n\n\n" \
             "def f(a, b):\n    return a, b\n\n\n" \
             "@register.register_method(output_names=['y'])\ndef m(x1, x2):" + textwrap.dedent(body).replace("\n", "\n    ")
    write_servable(tmp_path, "rules", config, {"1/add.jaxexport": add_file})
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "rules", device_ids=0))
    server.stop()
    assert text in str(caught.value)


# --------------------------------------------------------------------------- contexts

def test_context_and_device_infos_have_mindspores_shape_and_checks():
    with pytest.raises(RuntimeError, match="Parameter 'thread_affinity_core_list' should be tuple/list of int"):
        register.Context(thread_affinity_core_list=1)
    context = register.Context(thread_num=3, thread_affinity_core_list=[1, 2], enable_parallel=True)
    context.append_device_info(register.GPUDeviceInfo(precision_mode="fp16"))
    context.append_device_info(register.AscendDeviceInfo(input_format="NHWC1C0"))
    with pytest.raises(RuntimeError, match="Device info of type gpu has already been appended"):
        context.append_device_info(register.GPUDeviceInfo())
    assert (context.model_context.thread_num, context.model_context.enable_parallel) == (3, 1)
    assert [d["device_type"] for d in context.model_context.device_list] == ["gpu", "ascend"]
    with pytest.raises(RuntimeError, match="Set gpu device info failed, unsupported option precision_xxx_mode"):
        register.GPUDeviceInfo(precision_xxx_mode="fp16")
    with pytest.raises(RuntimeError, match="Cpu device info 'precision_mode' can only be 'origin', 'fp16'"):
        register.CPUDeviceInfo(precision_mode="fp8")
    options = register.GpuOptions(precision_mode="fp16")
    assert options.context.model_context.device_list == [{"precision_mode": "fp16", "device_type": "gpu"}]


def test_a_context_reaches_the_backend_which_refuses_what_it_cannot_apply(tmp_path, add_file):
    write_servable(tmp_path, "ctx", """
        from mserve import register
        from mserve.register import Context, CPUDeviceInfo

        context = Context(thread_num=2)
        context.append_device_info(CPUDeviceInfo(precision_mode="fp16"))
        model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False, context=context)


        @register.register_method(output_names=["y"])
        def add(x1, x2):
            return register.add_stage(model, x1, x2, outputs_count=1)
    """, {"1/add.jaxexport": add_file})
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "ctx", device_ids=0))
    server.stop()
    assert "jax_export backend has no use for context" in str(caught.value)
    assert "'precision_mode': 'fp16'" in str(caught.value)


# --------------------------------------------------------------------------- register checks

@pytest.mark.parametrize("config, text", [
    ("""
    a = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)
    b = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)
    """, "model file 'add.jaxexport' has already been used"),
    ("""
    model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)

    def f(a, b):
        return a

    @register.register_method(output_names=["y"])
    def one(x1, x2):
        return register.add_stage(f, x1, x2, outputs_count=1)

    @register.register_method(output_names=["y", "z"])
    def two(x1, x2):
        return register.add_stage(f, x1, x2, outputs_count=2)
    """, "Stage function 'wired.f' outputs count 2 not match last registered count 1, method name 'two'"),
    ("""
    model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)

    @register.register_method(output_names=["y"])
    def one(x1, x2):
        return register.add_stage(model, x1, x2, outputs_count=1)

    @register.register_method(output_names=["y"])
    def two(x1, x2, x3):
        return register.add_stage(model, x1, x2, x3, outputs_count=1)
    """, "RegisterInputOutputInfo failed, inputs count 3 not match old count 2"),
    ("""
    @register.register_method(output_names=["y"])
    def m(x1, *x2):
        return x1
    """, "'m' input x2 cannot be VAR_POSITIONAL !"),
])
def test_register_checks_with_mindspores_texts(tmp_path, add_file, config, text):
    write_servable(tmp_path, "wired", "from mserve import register\n" + textwrap.dedent(config),
                   {"1/add.jaxexport": add_file})
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "wired", device_ids=0))
    server.stop()
    assert text in str(caught.value)


def test_register_model_module_and_an_undeclared_model(tmp_path, add_file):
    write_servable(tmp_path, "undeclared", """
        from mserve import register

        model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)
        stranger = register.model.Model("other.jaxexport")


        def call(x1, x2):
            return stranger.call(x1, x2)


        @register.register_method(output_names=["y"])
        def predict(x1, x2):
            return register.add_stage(call, x1, x2, outputs_count=1)
    """, {"1/add.jaxexport": add_file})
    with serving(server.ServableStartConfig(str(tmp_path), "undeclared", device_ids=0)) as url:
        reply = post(url, "/model/undeclared:predict", [{"x1": X, "x2": X}])
    assert "Model(other.jaxexport).call() failed: the model is not declared" in reply["error_msg"]


# --------------------------------------------------------------------------- inputs and outputs

class FakeTensor:
    """What a MindSpore Tensor offers a stage's caller: ``asnumpy()``."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def asnumpy(self):
        return self.value


STAGES_CONFIG = """
import numpy as np
from mserve import register

model = register.declare_model("row.jaxexport", "jax_export", with_batch_dim=False)


def one_tuple(x):
    return (x * 2,)


def tensor(x):
    return FakeTensor(x + 1)


class FakeTensor:
    def __init__(self, value):
        self.value = np.asarray(value)

    def asnumpy(self):
        return self.value


@register.register_method(output_names=["y"])
def unwrap(x):
    return register.add_stage(one_tuple, x, outputs_count=1)


@register.register_method(output_names=["y"])
def convert(x):
    return register.add_stage(tensor, x, outputs_count=1)


@register.register_method(output_names=["y"])
def row(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def test_inputs_are_checked_by_byte_size_and_stage_outputs_read_as_mindspore_does(tmp_path):
    row_file = export_to(tmp_path / "art/row.jaxexport", lambda x: x * 10, spec((1, 4)))
    write_servable(tmp_path / "s", "stages", STAGES_CONFIG, {"1/row.jaxexport": row_file})
    with serving(server.ServableStartConfig(str(tmp_path / "s"), "stages", device_ids=0)) as url:
        unwrap = post(url, "/model/stages:unwrap", [{"x": [1.0, 2.0]}])
        convert = post(url, "/model/stages:convert", [{"x": [1.0, 2.0]}])
        # (4,) holds the bytes of the model's (1, 4): MindSpore feeds them in the model's shape.
        same_bytes = post(url, "/model/stages:row", [{"x": [1.0, 2.0, 3.0, 4.0]}])
        too_big = post(url, "/model/stages:row", [{"x": [1.0, 2.0, 3.0, 4.0, 5.0]}])
        wrong_type = post(url, "/model/stages:row", [{"x": [[1, 2, 3, 4]]}])
    assert unwrap == {"instances": [{"y": [2.0, 4.0]}]}
    assert convert == {"instances": [{"y": [2.0, 3.0]}]}
    assert same_bytes == {"instances": [{"y": [[10.0, 20.0, 30.0, 40.0]]}]}
    assert too_big["error_msg"] == ("Given model input 0 size 20 not match the size 16 defined in model (model input 0 "
                                    "is input 'x': shape (5,) float32 given, (1, 4) float32 expected)")
    assert wrong_type["error_msg"] == ("Given model input 0 data type kMSI_Int32 not match the data type kMSI_Float32 "
                                       "defined in model (model input 0 is input 'x': int32 given, float32 expected)")


# --------------------------------------------------------------------------- mserve.log

LOG_SCRIPT = """
from mserve import log as logger
logger.debug("debug msg test")
logger.info("info msg test")
logger.warning("warning msg test")
logger.error("error msg test")
print("level", logger.get_level())
"""


@pytest.mark.parametrize("env, seen, level", [
    ({"GLOG_v": "0"}, {"DEBUG", "INFO", "WARNING", "ERROR"}, "0"),
    ({}, {"WARNING", "ERROR"}, "2"),
    ({"GLOG_v": "3"}, {"ERROR"}, "3"),
    ({"GLOG_v": "3", "MS_SUBMODULE_LOG_v": "{SERVING:1}"}, {"INFO", "WARNING", "ERROR"}, "1"),
])
def test_log_module_follows_mindspores_variables_and_format(env, seen, level):
    clean = {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "MS_SUBMODULE_LOG_v")}
    done = subprocess.run([sys.executable, "-c", LOG_SCRIPT], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)
    found = {name for name in ("DEBUG", "INFO", "WARNING", "ERROR") if f"[{name}] SERVING(" in done.stderr}
    assert found == seen, done.stderr
    assert f"level {level}" in done.stdout
    assert "error msg test" in done.stderr and "<string>:" in done.stderr  # the caller's place, as MindSpore shows it


# --------------------------------------------------------------------------- listening

@pytest.mark.parametrize("address, text", [
    ("invalid address", "Serving Error: The format of the RESTful server address 'invalid address' is illegal"),
    ("127.0.0.1", "Serving Error: The format of the RESTful server address '127.0.0.1' is illegal"),
    ("127.0.0.1:5000000", "Serving Error: The port of the RESTful server address '127.0.0.1:5000000' is out of legal range [1 ~ 65535]"),
    ("unix:some_file", "Serving Error: RESTful server does not support binding to unix domain socket"),
    ("127.0.256.1:5000", "Serving Error: RESTful server start failed, bind to the socket address 127.0.256.1:5000 failed"),
    ("127.0.0.0.1:5000", "Serving Error: RESTful server start failed, bind to the socket address 127.0.0.0.1:5000 failed"),
])
def test_bad_restful_addresses_raise_mindspores_runtime_errors(address, text):
    try:
        with pytest.raises(RuntimeError) as caught:
            server.start_restful_server(address)
    finally:
        server.stop()
    assert str(caught.value).startswith(text)


def test_a_second_restful_or_grpc_server_is_refused_until_stop():
    try:
        server.start_restful_server("127.0.0.1:0")
        with pytest.raises(RuntimeError, match="^Serving Error: RESTful server is already running$"):
            server.start_restful_server("127.0.0.1:0")
        server.start_grpc_server("127.0.0.1:0")
        with pytest.raises(RuntimeError, match="^Serving Error: Serving gRPC server is already running$"):
            server.start_grpc_server("127.0.0.1:0")
    finally:
        server.stop()
    try:  # stop frees both
        server.start_restful_server("127.0.0.1:0")
        server.start_grpc_server("127.0.0.1:0")
    finally:
        server.stop()


# --------------------------------------------------------------------------- start scripts

START_SCRIPT = """
import sys
from mserve import server

server.start_servables(server.ServableStartConfig(sys.argv[1], "add", device_ids=0))
started = server.start_restful_server("127.0.0.1:0")
print("serving", started.port, flush=True)
"""


def test_a_start_script_launched_in_the_background_stops_on_sigint(tmp_path):
    """A shell starts background jobs with SIGINT ignored; MindSpore stops on it anyway, exit 0."""
    import signal

    from support import BUNDLED

    script = tmp_path / "serving_server.py"
    script.write_text(START_SCRIPT)
    env = {**os.environ, "MSERVE_PROCESSES": "single"}
    # The child inherits an ignored SIGINT across exec, as from a shell. (Not a preexec_fn: that
    # forks this process, whose gRPC channels from other tests can abort the child before its exec.)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen([sys.executable, str(script), str(BUNDLED)], stdout=subprocess.PIPE, text=True,
                                env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line
        port = int(line.split()[1])
        reply = requests.post(f"http://127.0.0.1:{port}/model/add:add_common",
                              json={"instances": [{"x1": X, "x2": X}]}, timeout=30).json()
        assert reply == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- dec_key

XOR_CONFIG = """
import numpy as np
from mserve import register
from mserve.backends import Backend, TensorSpec, register_backend


class Shift:
    def __init__(self, w):
        self.inputs = [TensorSpec(np.dtype(np.float32), (2, 2))]
        self.outputs = [TensorSpec(np.dtype(np.float32), (2, 2))]
        self.w = w

    def predict(self, arrays):
        return [arrays[0] + self.w]


def load(request):
    # The file is the float32 weights XOR-ed with the key, repeated: a toy cipher that
    # only a backend given the right dec_key reads back.
    raw = np.frombuffer(request.files[0].read_bytes(), np.uint8)
    key = np.frombuffer(request.dec_key * (len(raw) // len(request.dec_key) + 1), np.uint8)[:len(raw)]
    return Shift(np.frombuffer((raw ^ key).tobytes(), np.float32).reshape(2, 2))


register_backend(Backend("xor", ("xor",), ("cpu",), load, can_decrypt=True))
model = register.declare_model("w.xor", "xor", with_batch_dim=False)


@register.register_method(output_names=["y"])
def shift(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def test_dec_key_reaches_the_backend_with_device_processes(tmp_path):
    key = b"0123456789abcdef"
    weights = np.full((2, 2), 10.0, np.float32).tobytes()
    encrypted = bytes(a ^ b for a, b in zip(weights, key * 2))
    write_servable(tmp_path, "secret", XOR_CONFIG, {"1/w.xor": encrypted})
    server.use_processes("devices")
    with serving(server.ServableStartConfig(str(tmp_path), "secret", device_ids=0, dec_key=key), workers=1) as url:
        reply = post(url, "/model/secret:shift", [{"x": X}])
    assert reply == {"instances": [{"y": [[11.0, 12.0], [13.0, 14.0]]}]}


# --------------------------------------------------------------------------- model_file lists

def test_jax_export_model_of_several_files_is_called_by_subgraph(tmp_path):
    double = export_to(tmp_path / "art/double.jaxexport", lambda x: x * 2, spec((2, 2)))
    square = export_to(tmp_path / "art/square.jaxexport", lambda x: x * x, spec((2, 2)))
    write_servable(tmp_path / "s", "graphs", """
        from mserve import register

        model = register.declare_model(model_file=["double.jaxexport", "square.jaxexport"], model_format="jax_export",
                                       with_batch_dim=False)


        def both(x):
            return model.call(x) + model.call(x, subgraph=1)


        def missing(x):
            return model.call(x, subgraph=2)


        @register.register_method(output_names=["y"])
        def predict(x):
            return register.add_stage(both, x, outputs_count=1)


        @register.register_method(output_names=["y"])
        def direct(x):
            return register.add_stage(model, x, outputs_count=1)


        @register.register_method(output_names=["y"])
        def bad(x):
            return register.add_stage(missing, x, outputs_count=1)
    """, {"1/double.jaxexport": double, "1/square.jaxexport": square})
    with serving(server.ServableStartConfig(str(tmp_path / "s"), "graphs", device_ids=0)) as url:
        both = post(url, "/model/graphs:predict", [{"x": X}])
        direct = post(url, "/model/graphs:direct", [{"x": X}])
        bad = post(url, "/model/graphs:bad", [{"x": X}])
    assert both == {"instances": [{"y": [[3.0, 8.0], [15.0, 24.0]]}]}
    assert direct == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
    assert "The model does not have subgraph of index 2, the subgraph count of the model is 2" in bad["error_msg"]


# --------------------------------------------------------------------------- device_ids=None, versions

RECORDING_CONFIG = """
import numpy as np
from mserve import register
from mserve.backends import Backend, TensorSpec, register_backend

SEEN = []


class Echo:
    inputs = [TensorSpec(np.dtype(np.float32), (2, 2))]
    outputs = [TensorSpec(np.dtype(np.float32), (2, 2))]

    def __init__(self, devices):
        self.devices = list(devices)

    def predict(self, arrays):
        return [arrays[0]]


def load(request):
    SEEN.append(str(request.devices[0]))
    return Echo(request.devices)


# A backend whose own default is the GPU, as JAX's is on a GPU host.
register_backend(Backend("gpu_first", ("gpu_first",), ("cpu", "gpu"), load, default_device_type=lambda: "gpu"))
model = register.declare_model("m.bin", "gpu_first", with_batch_dim=False)


def where(x):
    return np.array(SEEN[-1])


@register.register_method(output_names=["y"])
def echo(x):
    return register.add_stage(model, x, outputs_count=1)


@register.register_method(output_names=["device"])
def device(x):
    return register.add_stage(where, x, outputs_count=1)
"""


@pytest.mark.parametrize("kwargs, device", [({}, "cpu:0"), ({"device_ids": 0}, "gpu:0"),
                                            ({"device_type": "GPU"}, "gpu:0")])
def test_device_ids_none_runs_models_on_the_cpu_as_mindspore_does(tmp_path, kwargs, device):
    write_servable(tmp_path, "rec", RECORDING_CONFIG, {"1/m.bin": b"x"})
    with serving(server.ServableStartConfig(str(tmp_path), "rec", **kwargs)) as url:
        reply = post(url, "/model/rec:device", [{"x": X}])
    assert reply == {"instances": [{"device": device}]}


def test_model_less_servable_needs_no_version_folder_and_model_ones_say_mindspores_text(tmp_path, add_file):
    write_servable(tmp_path, "plain", """
        from mserve import register


        def twice(x):
            return x * 2


        @register.register_method(output_names=["y"])
        def double(x):
            return register.add_stage(twice, x, outputs_count=1)
    """)
    with serving(server.ServableStartConfig(str(tmp_path), "plain")) as url:
        latest = post(url, "/model/plain:double", [{"x": 2.5}])
        first = post(url, "/model/plain/version/1:double", [{"x": 1.5}])
    assert latest == {"instances": [{"y": 5.0}]} and first == {"instances": [{"y": 3.0}]}
    write_servable(tmp_path, "models", """
        from mserve import register

        model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)


        @register.register_method(output_names=["y"])
        def add(x1, x2):
            return register.add_stage(model, x1, x2, outputs_count=1)
    """)
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "models"))
    assert "There is no valid version directory of models while there are models declared in servable_config.py" \
           in str(caught.value)
    (tmp_path / "models/1").mkdir()
    (tmp_path / "models/1/add.jaxexport").write_bytes(add_file.read_bytes())
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "models", version_number=2))
    server.stop()
    assert "There is no specified version directory of models, specified version number: 2" in str(caught.value)


# --------------------------------------------------------------------------- Pillow

def test_pillow_range_admits_a_pillow_with_mindspores_image_antialias():
    """MindSpore's LeNet example resizes with Image.ANTIALIAS (removed in Pillow 10):
    mserve's range must admit Pillow 9.5, the last with it (Python 3.10 and 3.11)."""
    import tomllib

    from packaging.requirements import Requirement
    from support import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pillow = next(Requirement(d) for d in deps if Requirement(d).name.lower() == "pillow")
    assert pillow.specifier.contains("9.5.0") and pillow.specifier.contains("11.0.0")


SERVER_ONLY_SCRIPT = """
from mserve import log as logger
from mserve import server

server.start_grpc_server("127.0.0.1:0")
try:
    server.start_grpc_server("127.0.0.1:0")
except RuntimeError:
    pass
"""


def test_a_script_that_starts_servers_but_no_servable_ends_as_mindspore_does():
    clean = {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "MS_SUBMODULE_LOG_v")}
    done = subprocess.run([sys.executable, "-c", SERVER_ONLY_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**clean, "GLOG_v": "1", "MSERVE_PROCESSES": "single"})
    assert done.returncode == 0, done.stderr
    assert "[INFO] SERVING(" in done.stderr and "Serving gRPC server listening on" in done.stderr
    assert "[ERROR] SERVING(" in done.stderr and "Serving gRPC server is already running" in done.stderr


def test_a_batched_stage_that_returns_fewer_or_more_results_fails_only_the_missing(tmp_path):
    write_servable(tmp_path, "batch", """
        from mserve import register


        def fewer(instances):
            for i in range(len(instances) - 1):
                yield i


        def more(instances):
            for i in range(len(instances) + 1):
                yield i


        def raising(instances):
            for (x,) in instances:
                if x > 1:
                    raise ValueError("too big")
                yield x


        @register.register_method(output_names=["y"])
        def short(x):
            return register.add_stage(fewer, x, outputs_count=1, batch_size=4, tag="Postprocess")


        @register.register_method(output_names=["y"])
        def long(x):
            return register.add_stage(more, x, outputs_count=1, batch_size=4)


        @register.register_method(output_names=["y"])
        def fails(x):
            return register.add_stage(raising, x, outputs_count=1, batch_size=4)
    """)
    with serving(server.ServableStartConfig(str(tmp_path), "batch")) as url:
        short = post(url, "/model/batch:short", [{"x": 1}, {"x": 2}])
        long = post(url, "/model/batch:long", [{"x": 1}, {"x": 2}])
        fails = post(url, "/model/batch:fails", [{"x": 1}, {"x": 2}, {"x": 0}])
    assert short["instances"][0] == {"y": 0}
    assert short["instances"][1]["error_msg"] == (
        "Postprocess Failed: The number 1 of instances returned by function 'fewer' is not equal to the number 2 of "
        "instances provided to this function.")
    assert long == {"instances": [{"y": 0}, {"y": 1}]}
    assert fails["instances"][0] == {"y": 1} and "too big" in fails["instances"][1]["error_msg"]
    assert "The number 2 of instances returned by function 'raising'" in fails["instances"][2]["error_msg"]


# --------------------------------------------------------------------------- MindIR from MindSpore 2.0

def test_a_mindir_the_installed_mindspore_cannot_load_says_why_and_what_to_do(tmp_path):
    from pathlib import Path

    from mserve.backends.mindspore import load_failure

    text = load_failure(Path("/m/matmul_0.mindir"), "Got null AbstractBasePtr for input [0] for primitive Depend",
                        "2.0.0", "2.10.0")
    assert text.startswith("mindspore.load(matmul_0.mindir) failed: Got null AbstractBasePtr")
    assert "exported by MindSpore 2.0.0; the installed MindSpore 2.10.0 cannot load this graph" in text
    assert "no load option changes that" in text and "Export the model again with MindSpore 2.10.0" in text
    assert "model_format='jax_export'" in text
    same = load_failure(Path("/m/x.mindir"), "bad graph", "2.10.1", "2.10.0")
    assert same == "mindspore.load(x.mindir) failed: bad graph"  # same release line: nothing to add


@pytest.mark.skipif(not os.environ.get("MSERVE_MINDIR_2_0"), reason="MSERVE_MINDIR_2_0 names no MindIR exported by "
                    "MindSpore 2.0 (for example MindSpore's matmul_multi_subgraphs matmul_0.mindir)")
def test_a_mindspore_2_0_mindir_fails_to_load_with_that_text(tmp_path):
    pytest.importorskip("mindspore")
    from pathlib import Path

    from mserve.backends import Device
    from mserve.backends.mindspore import MindIRModel

    model = MindIRModel([Path(os.environ["MSERVE_MINDIR_2_0"])], Device("cpu", 0), None, "AES-GCM")
    with pytest.raises(RuntimeError, match="exported by MindSpore 2.0") as caught:
        model.warm_up([[tuple(s.shape) for s in model.inputs]])  # MindSpore fails at the graph's first run
    assert "Export the model again" in str(caught.value)


def test_untagged_stage_errors_and_placeholder_names_read_as_mindspores(tmp_path):
    write_servable(tmp_path, "named", """
        from mserve import register


        def check(x):
            raise ValueError("runtime error text")


        @register.register_method(output_names=["y"])
        def predict(x):
            return register.add_stage(check, x, outputs_count=1)
    """)
    with serving(server.ServableStartConfig(str(tmp_path), "named")) as url:
        reply = post(url, "/model/named:predict", [{"x": 1.0}])
    assert reply["error_msg"] == "Call Function 'named.check' Failed: runtime error text"
    write_servable(tmp_path, "unpack", """
        from mserve import register


        @register.register_method(output_names=["y"])
        def predict(x):
            a, b = x
            return a
    """)
    with pytest.raises(RuntimeError, match="cannot unpack non-iterable _TensorDef object"):
        server.start_servables(server.ServableStartConfig(str(tmp_path), "unpack"))
    server.stop()


def test_deprecated_pipeline_calls_take_any_function_as_mindspore_does(tmp_path, add_file):
    """call_*_pipeline hands the function the list of instances without checking its
    parameters (MindSpore's tests rely on reaching the order checks past it)."""
    write_servable(tmp_path, "pipe", """
        from mserve import register

        register.declare_servable("add.jaxexport", "jax_export", with_batch_dim=False)


        def per_instance(x1, x2):
            return x1, x2


        @register.register_method(output_names=["y"])
        def m(x1, x2):
            y = register.call_postprocess_pipeline(per_instance, x1, x2)
            x1, x2 = register.call_preprocess_pipeline(per_instance, x1, x2)
            y = register.call_servable(x1, x2)
            return y
    """, {"1/add.jaxexport": add_file})
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "pipe", device_ids=0))
    server.stop()
    assert ("call_postprocess or call_postprocess_pipeline should be invoked after call_preprocess_pipeline"
            in str(caught.value))


# --------------------------------------------------------------------------- server.master, server.register

def test_master_context_limits_the_requests_waiting(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    write_servable(tmp_path, "slow", """
        import time
        from mserve import register


        def wait(x):
            time.sleep(1.0)
            return x


        @register.register_method(output_names=["y"])
        def predict(x):
            return register.add_stage(wait, x, outputs_count=1)
    """)
    with pytest.raises(RuntimeError, match="Parameter 'max_enqueued_requests' should be >= 1"):
        server.master.context.set_max_enqueued_requests(0)
    server.master.context.set_max_enqueued_requests(1)
    try:
        with serving(server.ServableStartConfig(str(tmp_path), "slow")) as url:
            with ThreadPoolExecutor(2) as pool:
                replies = list(pool.map(lambda _: post(url, "/model/slow:predict", [{"x": 1.0}]), range(2)))
            server.master.context.set_max_enqueued_requests(10000)  # moves the running server's limit too
            with ThreadPoolExecutor(2) as pool:
                again = list(pool.map(lambda _: post(url, "/model/slow:predict", [{"x": 1.0}]), range(2)))
    finally:
        server.master.context.set_max_enqueued_requests(10000)
    errors = [r.get("error_msg", "") for r in replies]
    assert sum("enqueued requests count exceeds the limit 1" in e for e in errors) == 1, replies
    assert again == [{"instances": [{"y": 1.0}]}] * 2


def test_server_register_and_servable_local_have_mindspores_names(tmp_path):
    from mserve.server import _servable_local
    from mserve.server.register import (  # noqa: F401
        AclOptions, AscendDeviceInfo, Context, CPUDeviceInfo, GpuOptions, GPUDeviceInfo, call_servable,
        declare_servable,
    )

    (tmp_path / "add/1").mkdir(parents=True)
    first = server.ServableStartConfig(str(tmp_path), "add", device_ids=2, version_number=0)
    second = server.ServableStartConfig(str(tmp_path), "add", device_ids=(1, 3), version_number=1)
    (merged,) = _servable_local.merge_config((first, second))
    assert merged.version_number == 1 and tuple(merged.device_ids) == (2, 1, 3)


def test_cpu_device_ids_are_labels_as_in_mindspore(tmp_path, add_file):
    """MindSpore's tensor_add example starts device_ids=(0, 1): on the CPU, two device
    processes, each on the host's CPU."""
    write_servable(tmp_path, "add", """
        from mserve import register

        model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)


        @register.register_method(output_names=["y"])
        def add_common(x1, x2):
            return register.add_stage(model, x1, x2, outputs_count=1)
    """, {"1/add.jaxexport": add_file})
    server.use_processes("devices")
    with serving(server.ServableStartConfig(str(tmp_path), "add", device_ids=(0, 1), device_type="CPU"),
                 workers=1) as url:
        replies = [post(url, "/model/add:add_common", [{"x1": X, "x2": X}]) for _ in range(4)]
        processes = len(server.default_runtime().devices.devices)
    assert replies == [{"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}] * 4
    assert processes == 2


# --------------------------------------------------------------------------- start-up texts of MindSpore's UTs

ADD_CONFIG = """
    from mserve import register

    model = register.declare_model("add.jaxexport", "jax_export", with_batch_dim=False)


    @register.register_method(output_names=["y"])
    def add_common(x1, x2):
        return register.add_stage(model, x1, x2, outputs_count=1)
"""


def start_error(config):
    with pytest.raises(RuntimeError) as caught:
        server.start_servables(config)
    server.stop()
    return str(caught.value)


def test_missing_files_and_folders_fail_with_mindspores_texts(tmp_path, add_file):
    text = start_error(server.ServableStartConfig(str(tmp_path / "nowhere"), "add", device_ids=0))
    assert text.startswith(f"Check servable config failed, directory '{tmp_path / 'nowhere' / 'add'}' not exist")
    (tmp_path / "add").mkdir()
    text = start_error(server.ServableStartConfig(str(tmp_path), "add", device_ids=0))
    assert text.startswith(f"Check servable config failed, file '{tmp_path / 'add' / 'servable_config.py'}' not exist")
    write_servable(tmp_path, "add", ADD_CONFIG, {"1/other.jaxexport": add_file})
    text = start_error(server.ServableStartConfig(str(tmp_path), "add", device_ids=0))
    assert text.startswith(f"Load model failed, servable directory: '{tmp_path}', servable name: 'add', model file: "
                           f"'add.jaxexport', version number 1 (model file")
    # A folder "0" is no version: 0 asks for the newest.
    write_servable(tmp_path, "zero", ADD_CONFIG, {"0/add.jaxexport": add_file})
    text = start_error(server.ServableStartConfig(str(tmp_path), "zero", device_ids=0))
    assert text.startswith("There is no valid version directory of models while there are models declared")


GPU_ONLY_CONFIG = """
    import numpy as np
    from mserve import register
    from mserve.backends import Backend, TensorSpec, register_backend


    def load(request):
        raise AssertionError("never loaded: no device type fits")


    register_backend(Backend("gpu_only", ("gpu_only",), ("gpu",), load, default_device_type=lambda: "gpu"))
    model = register.declare_model("m.bin", "gpu_only", with_batch_dim=False)


    @register.register_method(output_names=["y"])
    def echo(x):
        return register.add_stage(model, x, outputs_count=1)
"""


def test_models_without_a_backend_on_the_target_device_type_fail_with_mindspores_texts(tmp_path):
    write_servable(tmp_path, "gpu", GPU_ONLY_CONFIG, {"1/m.bin": b"x"})
    try:
        text = start_error(server.ServableStartConfig(str(tmp_path), "gpu"))  # device_ids=None: the CPU
        assert text.startswith("Servable 'gpu' has models declared by declare_model, but parameter 'device_ids' of "
                               "ServableStartConfig is not set in Serving startup script when the MindSpore or Lite "
                               "inference package not support CPU (no installed backend serves")
        text = start_error(server.ServableStartConfig(str(tmp_path), "gpu", device_ids=1, device_type="Ascend"))
        assert text.startswith("The device type 'ascend' of servable name gpu is inconsistent with current running "
                               "environment, supported device type: None or 'gpu' (no installed backend serves")
    finally:
        from mserve.backends import unregister_backend

        unregister_backend("gpu_only")


STAGE_RESULTS_CONFIG = """
    import numpy as np
    from mserve import register


    def pair(x):
        return [x, x]


    def pairs(instances):
        return [[x, x] for (x,) in instances]


    def dtype_of(x):
        return x.dtype


    def mark(x):
        x[0] = 123
        return x


    def after(x, marked):
        return x + 1, marked + 2


    @register.register_method(output_names=["y"])
    def one_of_two(x):
        return register.add_stage(pair, x, outputs_count=1)


    @register.register_method(output_names=["y"])
    def one_of_two_batched(x):
        return register.add_stage(pairs, x, outputs_count=1, batch_size=2)


    @register.register_method(output_names=["y"])
    def not_a_tensor(x):
        return register.add_stage(dtype_of, x, outputs_count=1)


    @register.register_method(output_names=["x", "marked"])
    def in_place(x):
        marked = register.add_stage(mark, x, outputs_count=1)
        x, marked = register.add_stage(after, x, marked, outputs_count=2)
        return x, marked
"""


def test_stage_results_are_read_and_inputs_given_as_mindspore_does(tmp_path):
    """A list of two for one output fails the stage; a value that is no tensor fails the
    stage that returned it; a stage may change its input array in place and later stages
    see the change (gRPC's arrays arrive read-only and are copied for Python stages)."""
    from mserve.client import Client

    write_servable(tmp_path, "st", STAGE_RESULTS_CONFIG)
    with serving(server.ServableStartConfig(str(tmp_path), "st")) as url:
        grpc_target = server.start_grpc_server("127.0.0.1:0", additional=True).target
        one = post(url, "/model/st:one_of_two", [{"x": 1.0}])
        batched = post(url, "/model/st:one_of_two_batched", [{"x": 1.0}])
        rest_dtype = post(url, "/model/st:not_a_tensor", [{"x": 1.0}])
        grpc_dtype = Client(grpc_target, "st", "not_a_tensor").infer([{"x": np.float32(1.0)}])
        x = np.ones([3], np.int32)
        marked = Client(grpc_target, "st", "in_place").infer([{"x": x}, {"x": x}])
    assert one["error_msg"] == ("Call Function 'st.pair' Failed: The outputs number 2 of one instance returned by "
                                "function 'pair' is not equal to the outputs number 1 registered in method")
    assert batched["error_msg"].startswith("Call Function 'st.pairs' Failed: The outputs number 2")
    assert rest_dtype["error_msg"].startswith("Call Function 'st.dtype_of' Failed: not_a_tensor output cannot be sent")
    assert grpc_dtype["error"].startswith("Call Function 'st.dtype_of' Failed: not_a_tensor output cannot be sent")
    for result in marked:
        assert result["x"].tolist() == [124, 2, 2] and result["marked"].tolist() == [125, 3, 3]


def test_grpc_tls_and_unix_socket_addresses_as_mindspore_has_them(tmp_path, monkeypatch, add_file):
    import trustme

    from mserve.client import Client

    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    not_a_key = server.SSLConfig(str(tmp_path / "server.crt"), str(tmp_path / "server.crt"))
    with pytest.raises(RuntimeError) as caught:
        server.start_grpc_server("127.0.0.1:0", ssl_config=not_a_key, additional=True)
    assert str(caught.value).startswith("Serving Error: Serving gRPC server start failed, create server failed, "
                                        "address 127.0.0.1:0: load private_key from")
    # MindSpore Serving makes ./unix_socket_files when it starts; scripts put sockets there.
    monkeypatch.chdir(tmp_path)
    write_servable(tmp_path, "add", ADD_CONFIG, {"1/add.jaxexport": add_file})
    try:
        server.start_servables(server.ServableStartConfig(str(tmp_path), "add", device_ids=0))
        server.start_grpc_server("unix:unix_socket_files/add", additional=True)
        result = Client("unix:unix_socket_files/add", "add", "add_common").infer(
            [{"x1": np.ones([2, 2], np.float32), "x2": np.ones([2, 2], np.float32)}])
    finally:
        server.stop()
    assert result[0]["y"].tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_mindspore_2_0_dataset_modules_resolve_to_their_successors(monkeypatch):
    """MindSpore's ResNet config imports ``mindspore.dataset.vision.c_transforms``,
    which later MindSpore releases dropped for ``mindspore.dataset.vision``."""
    import importlib
    import importlib.util

    from mserve.serving import mindspore_modules

    monkeypatch.setitem(mindspore_modules.SUCCESSORS, "mserve_old_json_name", "json")
    monkeypatch.delitem(sys.modules, "mserve_old_json_name", raising=False)
    mindspore_modules.install()
    old = importlib.import_module("mserve_old_json_name")
    assert old.dumps is __import__("json").dumps and old is not sys.modules["json"]
    sys.modules.pop("mserve_old_json_name")
    if importlib.util.find_spec("mindspore") is None:
        return  # the MindSpore part needs mserve[mindspore]
    vc = importlib.import_module("mindspore.dataset.vision.c_transforms")
    tc = importlib.import_module("mindspore.dataset.transforms.c_transforms")
    assert vc.Decode and vc.Resize and vc.Normalize and vc.HWC2CHW and tc.Compose
