"""mserve as a drop-in for MindSpore Serving: its examples, its start scripts, its API.

* MindSpore Serving's examples (``tests/examples``: tensor_add, add_sub_pipeline,
  lenet with both ``Model.call`` patterns), shipped with their JAX models and started
  as a user starts it: ``python serving_server.py`` in a subprocess, a script that
  ends after ``start_restful_server``. The process keeps serving until SIGTERM or
  SIGINT, then exits 0; the clients are MindSpore's REST idiom.
* MindSpore's matmul_multi_subgraphs: ``Model.call(..., subgraph=i)`` over the graphs
  of one model (through a backend plugin that loads each file as a graph).
* ``ServableStartConfig`` and ``register``: MindSpore's parameters, order, defaults,
  checks and texts; device types; dec_key; merged configs; relative directories;
  helper modules beside servable_config.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from support import BUNDLED, REPO, export_to, free_port, serving, spec, write_matmul_subgraphs, write_servable

from mserve import server
from mserve.backends import unregister_backend
from mserve.errors import ServableLoadError
from mserve.serving.servable import load_definition

EXAMPLES = Path(__file__).resolve().parent / "examples"
DIGITS = REPO / "sample_data" / "digits"
# Runs a start script exactly as `python serving_server.py` would (it is __main__,
# sys.argv[0] is its path), then says when its main has returned.
RUN_SCRIPT = (
    "import runpy, sys; script = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(script, run_name='__main__'); print('MAIN RETURNED', flush=True)"
)
START_DEADLINE = 300.0  # loading and compiling on a busy 2-core machine; a hang guard, not a timing


def _example(tmp_path: Path, name: str, port: int, grpc_port: int | None = None) -> Path:
    """A copy of the example as shipped (its models in its version folders), listening
    on ``port`` for REST and on ``grpc_port`` (default: another free port) for gRPC:
    never on the example's own 5500, which a user's `mserve start` may hold."""
    folder = tmp_path / name
    shutil.copytree(EXAMPLES / name, folder)
    script = folder / "serving_server.py"
    script.write_text(script.read_text().replace("127.0.0.1:1500", f"127.0.0.1:{port}")
                      .replace("127.0.0.1:5500", f"127.0.0.1:{grpc_port or free_port()}"))
    return folder


def _client(folder: Path):
    """The example's serving_client.py, imported as its own module."""
    module_spec = importlib.util.spec_from_file_location(f"client_{folder.name}", folder / "serving_client.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class StartScript:
    """A start script run as a subprocess from another directory; output to files."""

    def __init__(self, script: Path, port: int, cwd: Path, env: dict | None = None):
        self.address = f"127.0.0.1:{port}"
        self.out = (cwd / f"{script.parent.name}.out").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUN_SCRIPT, str(script)], cwd=cwd, stdout=self.out, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def wait_main_returned(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while "MAIN RETURNED" not in self.output():
            assert self.proc.poll() is None, f"the start script exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"the start script did not return:\n{self.output()}"
            time.sleep(0.2)

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running 120 s after {signal.Signals(sig).name}:\n{self.output()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def _run_example(tmp_path: Path, name: str, grpc_port: int | None = None, env: dict | None = None):
    port = free_port()
    folder = _example(tmp_path, name, port, grpc_port)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir(exist_ok=True)
    script = StartScript(folder / "serving_server.py", port, elsewhere, env)
    script.wait_main_returned()
    return script, folder


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize("name", ["tensor_add", "add_sub_pipeline", "lenet"])
def test_examples_ship_their_models_and_copies_never_listen_on_5500(tmp_path, name):
    """A user runs ``python tests/examples/NAME/serving_server.py`` as shipped: every
    model file its servable_config.py declares is in version folder 1. The tests'
    copies listen on free ports only."""
    config = next((EXAMPLES / name).glob("*/servable_config.py"))
    declared = re.findall(r'model_file="([^"]+)"', config.read_text())
    assert declared
    for model_file in declared:
        shipped = config.parent / "1" / model_file
        assert shipped.is_file() and shipped.stat().st_size > 0, f"{shipped} is missing"
    copy = _example(tmp_path, name, free_port())
    assert "5500" not in (copy / "serving_server.py").read_text()


def test_tensor_add_example_serves_after_its_script_returns_until_sigterm(tmp_path):
    script, folder = _run_example(tmp_path, "tensor_add")
    try:
        client = _client(folder)
        # main has returned; the process still serves, as MindSpore Serving's does
        assert script.proc.poll() is None
        result = client.run_add_restful(script.address)
        x1 = np.asarray([[1.1, 2.2], [3.3, 4.4]], np.float32)
        x2 = np.asarray([[5.5, 6.6], [7.7, 8.8]], np.float32)
        assert np.array_equal(np.array(result["instances"][0]["y"], np.float32), x1 + x2)
        result = client.run_add_cast_restful(script.address)
        assert result == {"instances": [{"y": [[i + 1.0] * 2] * 2} for i in range(3)]}
        assert script.stop(signal.SIGTERM) == 0, script.output()
        assert "Traceback" not in script.output()
    finally:
        script.close()


@pytest.mark.parametrize("processes", ["single", "devices"])
def test_tensor_add_example_over_grpc_with_mindspores_client_code(tmp_path, processes):
    """The same example as a MindSpore user runs it: the start script serves gRPC
    (``start_grpc_server``, before ``start_restful_server``) beside REST, and the
    client code is MindSpore's with only the import changed (``from mserve.client
    import Client``); in one process, and in the default architecture (gRPC served
    by front-end processes of its own)."""
    grpc_port = free_port()
    env = {"MSERVE_PROCESSES": processes, "MSERVE_WORKERS": "2"}
    script, folder = _run_example(tmp_path, "tensor_add", grpc_port, env)
    try:
        client = _client(folder)
        result = client.run_add_common(f"127.0.0.1:{grpc_port}")
        assert len(result) == 3
        for i, instance in enumerate(result):
            assert instance["y"].dtype == np.float32
            assert np.array_equal(instance["y"], np.full((2, 2), 2.0 * (i + 1), np.float32))
        cast = client.run_add_cast(f"127.0.0.1:{grpc_port}")
        assert np.array_equal(cast[0]["y"], np.full((2, 2), 2.0, np.float32))
        assert script.stop(signal.SIGTERM) == 0, script.output()
    finally:
        script.close()


def test_a_script_serving_only_grpc_keeps_serving_after_main_returns(tmp_path):
    """grpcio's threads are daemons too: a start script that only calls
    ``start_grpc_server`` must keep serving once it returns, until SIGINT."""
    grpc_port = free_port()
    port = free_port()
    folder = _example(tmp_path, "tensor_add", port, grpc_port)
    script_file = folder / "serving_server.py"
    script_file.write_text("\n".join(
        line for line in script_file.read_text().splitlines() if "start_restful_server" not in line
    ) + "\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir(exist_ok=True)
    script = StartScript(script_file, port, elsewhere)
    try:
        script.wait_main_returned()
        time.sleep(1.0)  # past the moment a daemon-only process would have exited
        assert script.proc.poll() is None, script.output()
        result = _client(folder).run_add_common(f"127.0.0.1:{grpc_port}")
        assert np.array_equal(result[0]["y"], np.full((2, 2), 2.0, np.float32)), result
        assert script.stop(signal.SIGINT) == 0, script.output()
    finally:
        script.close()


def test_add_sub_pipeline_example_stops_on_sigint_with_exit_0(tmp_path):
    script, folder = _run_example(tmp_path, "add_sub_pipeline")
    try:
        client = _client(folder)
        assert client.run_add_sub_only_model(script.address) == {"instances": [{"y": [[40.0, 40.0], [30.0, 30.0]]}]}
        assert client.run_add_sub_complex(script.address) == {"instances": [{"y": [[42.0, 42.0], [32.0, 32.0]]}]}
        assert script.stop(signal.SIGINT) == 0, script.output()
        assert "Traceback" not in script.output() and "KeyboardInterrupt" not in script.output()
    finally:
        script.close()


def test_lenet_example_with_both_model_call_patterns(tmp_path):
    """The pipeline, ``model.call(x)`` per instance, and ``model.call([[x] for x in
    images])`` over a batch (``for inst in outputs: y = inst[0]``) all read the ten
    sample digits right."""
    script, folder = _run_example(tmp_path, "lenet")
    try:
        client = _client(folder)
        for method in ("classify_top1", "classify_top1_v1", "classify_top1_v2"):
            labels = client.run_restful_classify_top1(script.address, str(DIGITS), method)
            assert [(Path(f).name, label) for f, label in labels] == [(f"digit_{d}.png", d) for d in range(10)], method
        assert script.stop(signal.SIGTERM) == 0, script.output()
    finally:
        script.close()


STOPPING_SCRIPT = """
import json
import re
import os
import sys

import requests
from mserve import server


def start():
    servable_dir = os.path.dirname(os.path.realpath(sys.argv[0]))
    config = server.ServableStartConfig(servable_directory=servable_dir, servable_name="add", device_ids=None)
    server.start_servables(servable_configs=config)
    server.start_restful_server(address="127.0.0.1:{port}")
    body = {{"instances": [{{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 1.0], [1.0, 1.0]]}}]}}
    result = requests.post("http://127.0.0.1:{port}/model/add:add_common", data=json.dumps(body))
    print(result.text, flush=True)
    server.stop()


if __name__ == "__main__":
    start()
"""


def test_a_script_that_calls_stop_exits_by_itself(tmp_path):
    port = free_port()
    folder = _example(tmp_path, "tensor_add", port)
    script = folder / "stopping_server.py"
    script.write_text(STOPPING_SCRIPT.format(port=port))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=START_DEADLINE)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == '{"instances":[{"y":[[2.0,3.0],[4.0,5.0]]}]}'


def _keep_serving_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "mserve-keep-serving"]


def test_keep_alive_follows_start_and_stop_and_leaves_other_handlers_alone():
    config = server.ServableStartConfig(str(BUNDLED), "add")
    for _ in range(2):  # stop, then start again in the same process
        with serving(config):
            (waiter,) = _keep_serving_threads()
            assert not waiter.daemon
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        waiter.join(30)
        assert not waiter.is_alive()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def own(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own)
    try:
        with serving(config):
            assert signal.getsignal(signal.SIGTERM) is own  # a program's own handler is kept
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- ServableStartConfig


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"servable_directory": 1}, "Parameter 'servable_directory' should be str, but actually <class 'int'>"),
        ({"servable_directory": ""}, "Parameter 'servable_directory' should not be empty str"),
        ({"servable_name": ""}, "Parameter 'servable_name' should not be empty str"),
        ({"version_number": -1}, "Parameter 'version_number' should be >= 0"),
        ({"version_number": 1.0}, "Parameter 'version_number' should be int, but actually <class 'float'>"),
        ({"num_parallel_workers": 65}, "Parameter 'num_parallel_workers' should be in range [0,64]"),
        ({"num_parallel_workers": -1}, "Parameter 'num_parallel_workers' should be in range [0,64]"),
        ({"device_ids": -1}, "The item value '-1' in parameter 'device_ids' should be >= 0"),
        ({"device_ids": (0, 0)}, "The item value '0' in parameter 'device_ids' should not be repeated"),
        ({"device_ids": "0"}, "Parameter 'device_ids' should be int or tuple/list of int, but actually <class 'str'>"),
        ({"device_ids": [True]}, "should be int, but actually <class 'bool'>"),
        ({"device_type": "gpuu"}, "Unsupported device type 'gpuu', only support 'Ascend', 'GPU', 'CPU' and None, case ignored"),
        ({"device_type": "cuda"}, "Unsupported device type 'cuda'"),
        ({"dec_key": "0123456789abcdef"}, "Parameter 'dec_key' should be bytes, but actually <class 'str'>"),
        ({"dec_key": b""}, "Parameter 'dec_key' should not be empty bytes"),
        ({"dec_key": b"0" * 10}, "Parameter 'dec_key' length 10 expected to be 16, 24 or 32"),
        ({"dec_mode": "AES-XTS"}, "Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'"),
    ],
)
def test_servable_start_config_checks_like_mindspore(kwargs, text):
    args = {"servable_directory": str(BUNDLED), "servable_name": "add", **kwargs}
    with pytest.raises(RuntimeError) as caught:
        server.ServableStartConfig(**args)
    assert text in str(caught.value)


def test_servable_start_config_positional_order_and_defaults():
    config = server.ServableStartConfig(str(BUNDLED), "add", 1, 2, "Ascend", 3, b"k" * 16, "AES-CBC")
    assert (config.device_ids, config.version_number, config.device_type) == ((1,), 2, "Ascend")
    assert (config.num_parallel_workers, config.dec_key, config.dec_mode) == (3, b"k" * 16, "AES-CBC")
    default = server.ServableStartConfig(str(BUNDLED), "add")
    assert (default.device_ids, default.version_number, default.device_type) == (None, 0, None)
    assert (default.num_parallel_workers, default.dec_key, default.dec_mode) == (0, None, "AES-GCM")


def test_device_ids_none_and_any_case_device_type_serve():
    """``device_ids=None`` is MindSpore's own default and idiom: the default device."""
    configs = [server.ServableStartConfig(str(BUNDLED), "add", device_ids=None, device_type="CPU")]
    with serving(configs) as url:
        body = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}
        assert requests.post(url + "/model/add:add_common", json=body).json() == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}


def test_relative_servable_directory_is_taken_from_the_start_script(tmp_path, monkeypatch):
    (tmp_path / "scripts" / "models").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "scripts" / "serving_server.py")])
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = server.ServableStartConfig("models", "add")
    assert config.servable_directory == os.path.realpath(tmp_path / "scripts" / "models")


def test_a_device_type_changed_after_construction_is_refused_at_start():
    config = server.ServableStartConfig(str(BUNDLED), "add")
    config.device_type = "tpu"
    with pytest.raises(RuntimeError, match="Unsupported device type 'tpu'"):
        server.start_servables(config)


def test_ascend_for_jax_models_says_what_to_install():
    with pytest.raises(ServableLoadError) as caught:
        server.start_servables(server.ServableStartConfig(str(BUNDLED), "add", device_type="Ascend"))
    assert "pip install 'mserve[mindspore]'" in str(caught.value) and "jax_export" in str(caught.value)
    assert server.registry().servables() == {}


def test_a_dec_key_is_never_ignored():
    config = server.ServableStartConfig(str(BUNDLED), "add", dec_key=b"0123456789abcdef")
    with pytest.raises(ServableLoadError, match="cannot decrypt models"):
        server.start_servables(config)
    assert server.registry().servables() == {}


def test_cli_refuses_an_unknown_device_type_with_exit_2():
    mserve = Path(sys.executable).with_name("mserve")
    out = subprocess.run([str(mserve), "start", "--device-type", "gpuu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "gpuu" in out.stderr and "cpu, gpu or ascend" in out.stderr


INC_CONFIG = """
from mserve import register

model = register.declare_model(model_file="inc.jaxexport", model_format="jax_export", with_batch_dim=False)


@register.register_method(output_names=["y"])
def inc(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def test_configs_of_one_servable_are_merged(tmp_path):
    write_servable(tmp_path, "inc", INC_CONFIG)
    export_to(tmp_path / "inc/1/inc.jaxexport", lambda x: x + 1, spec((2,)))
    export_to(tmp_path / "inc/2/inc.jaxexport", lambda x: x + 2, spec((2,)))
    configs = [
        server.ServableStartConfig(str(tmp_path), "inc", version_number=1),
        server.ServableStartConfig(str(tmp_path), "inc", version_number=2, num_parallel_workers=2),
        server.ServableStartConfig(str(tmp_path), "inc", version_number=2),
    ]
    with serving(configs) as url:
        body = {"instances": [{"x": [0.0, 0.0]}]}
        for version, y in ((1, 1.0), (2, 2.0)):
            r = requests.post(f"{url}/model/inc/version/{version}:inc", json=body)
            assert r.json() == {"instances": [{"y": [y, y]}]}
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "inc", other / "inc")
    with pytest.raises(RuntimeError, match="The servable directory of servable name inc is different in multiple"):
        server.start_servables([configs[0], server.ServableStartConfig(str(other), "inc")])
    with pytest.raises(RuntimeError, match="The dec key or dec mode of servable name inc is different"):
        server.start_servables([configs[0], server.ServableStartConfig(str(tmp_path), "inc", dec_key=b"k" * 16)])
    assert server.registry().servables() == {}


def test_start_servables_checks_its_arguments():
    with pytest.raises(RuntimeError, match="Parameter 'servable_configs' should be ServableStartConfig, list or tuple"):
        server.start_servables("add")
    with pytest.raises(RuntimeError, match="The item of parameter 'servable_configs' should be ServableStartConfig"):
        server.start_servables(["add"])
    with pytest.raises(RuntimeError, match="Parameter 'enable_lite' should be bool"):
        server.start_servables(server.ServableStartConfig(str(BUNDLED), "add"), enable_lite=1)


# --------------------------------------------------------------------------- register


def test_declare_model_takes_mindspores_positional_order(tmp_path):
    write_servable(tmp_path, "m", """
        from mserve import register

        model = register.declare_model("m.jaxexport", "jax_export", True, {"max_batch_size": 4}, [1],
                                       {"thread_num": 1}, "mix.cfg")


        @register.register_method(output_names=["y"])
        def f(x, b):
            return register.add_stage(model, x, b, outputs_count=1)
    """)
    (model,) = load_definition(tmp_path, "m").models
    assert model.options == {"max_batch_size": 4}
    assert model.without_batch_dim_inputs == (1,)
    assert (model.context, model.config_file) == ({"thread_num": 1}, "mix.cfg")


@pytest.mark.parametrize(
    "call, text",
    [
        ('"m.jaxexport", "jax_export", 1', "Parameter 'with_batch_dim' should be bool, but actually <class 'int'>"),
        ('["a.jaxexport", "a.jaxexport"], "jax_export"', "The item value 'a.jaxexport' in parameter 'model_file' should not be repeated"),
        ('"m.jaxexport", "jax_export", without_batch_dim_inputs=[-1]', "The item value '-1' in parameter 'without_batch_dim_inputs' should be >= 0"),
        ('"m.jaxexport", "jax_export", options=[1]', "Parameter 'options' should be None, GpuOptions or AclOptions"),
    ],
)
def test_declare_model_checks(tmp_path, call, text):
    write_servable(tmp_path, "m", f"""
        from mserve import register

        model = register.declare_model({call})
    """)
    with pytest.raises(ServableLoadError) as caught:
        load_definition(tmp_path, "m")
    assert text in str(caught.value)


HELPER_CONFIG = """
from mserve import register
from .helper import tag
from {name}.helper import tag as same_tag


def answer(x):
    return tag() + "/" + same_tag()


@register.register_method(output_names=["y"])
def who(x):
    return register.add_stage(answer, x, outputs_count=1)
"""


def test_helpers_beside_servable_config_import_both_ways_and_never_leak(tmp_path):
    """Two servables with a helper module of the same name, and a servable of the
    same name loaded again from another directory: each gets its own helper."""
    first, second = tmp_path / "first", tmp_path / "second"
    for root, label in ((first, "first"), (second, "second")):
        for name in ("a", "b"):
            folder = write_servable(root, name, HELPER_CONFIG.format(name=name))
            (folder / "helper.py").write_text(f"def tag():\n    return '{label}-{name}'\n")
            (folder / "1").mkdir()

    def ask(url: str, name: str) -> str:
        return requests.post(f"{url}/model/{name}:who", json={"instances": [{"x": 1}]}).json()["instances"][0]["y"]

    with serving([server.ServableStartConfig(str(first), "a"), server.ServableStartConfig(str(first), "b")]) as url:
        assert (ask(url, "a"), ask(url, "b")) == ("first-a/first-a", "first-b/first-b")
    with serving(server.ServableStartConfig(str(second), "a")) as url:
        assert ask(url, "a") == "second-a/second-a"


def test_a_servable_name_taken_by_another_module_is_a_clear_error(tmp_path):
    write_servable(tmp_path, "json", INC_CONFIG)
    with pytest.raises(ServableLoadError, match="the module name 'json' is already taken"):
        load_definition(tmp_path, "json")


# --------------------------------------------------------------------------- Model.call


CALL_CONFIG = """
import numpy as np
from mserve import register

two = register.declare_model(model_file="two.jaxexport", model_format="jax_export")


def one_instance(x):
    total, double = two.call(x)  # several outputs: a tuple
    return total, double


def many_instances(instances):
    outputs = two.call(tuple((x,) for (x,) in instances))  # a tuple of instances
    assert isinstance(outputs, tuple) and all(isinstance(inst, tuple) and len(inst) == 2 for inst in outputs)
    return [(inst[0], inst[1]) for inst in outputs]


def misuse(kind):
    kind = str(kind)
    x = np.ones(3, np.float32)
    if kind == "count":
        return two.call(x, x)
    if kind == "subgraph":
        return two.call(x, subgraph=1)
    if kind == "format":
        return two.call([x, x])
    if kind == "none":
        return two.call()
    return two.call(np.ones(3, np.int32))


@register.register_method(output_names=["total", "double"])
def single(x):
    return register.add_stage(one_instance, x, outputs_count=2)


@register.register_method(output_names=["total", "double"])
def batch(x):
    return register.add_stage(many_instances, x, outputs_count=2, batch_size=0)


@register.register_method(output_names=["y"])
def wrong(kind):
    return register.add_stage(misuse, kind, outputs_count=1, tag="Misuse")
"""


def _sum_and_double(x):
    return x.sum(axis=1), x * 2


@pytest.fixture(scope="module")
def call_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("call")
    write_servable(root, "calls", CALL_CONFIG)
    export_to(root / "calls/1/two.jaxexport", _sum_and_double, spec("b, 3"))
    with serving(server.ServableStartConfig(str(root), "calls")) as url:
        yield url


def test_model_call_with_several_outputs(call_url):
    body = {"instances": [{"x": [1.0, 2.0, 3.0]}, {"x": [0.5, 0.5, 0.5]}]}
    expected = {"instances": [{"total": 6.0, "double": [2.0, 4.0, 6.0]}, {"total": 1.5, "double": [1.0, 1.0, 1.0]}]}
    assert requests.post(call_url + "/model/calls:single", json=body).json() == expected
    assert requests.post(call_url + "/model/calls:batch", json=body).json() == expected


@pytest.mark.parametrize(
    "kind, text",
    [
        ("count", "Model(two.jaxexport).call() failed: The inputs count 2 of instance 0 is not equal to the inputs count 1 of the model"),
        ("subgraph", "Model(two.jaxexport, subgraph=1).call() failed: The model does not have subgraph of index 1, the subgraph count of the model is 1"),
        ("format", "Model(two.jaxexport).call() failed: inputs format invalid"),
        ("none", "Model(two.jaxexport).call() failed: no inputs provided"),
        ("dtype", "Model(two.jaxexport).call() failed: Given model input 0 data type kMSI_Int32 not match the data type kMSI_Float32"),
    ],
)
def test_model_call_errors(call_url, kind, text):
    r = requests.post(call_url + "/model/calls:wrong", json={"instances": [{"kind": kind}]})
    assert r.status_code == 400
    assert r.json()["error_msg"].startswith("Misuse Failed: " + text), r.json()


# --------------------------------------------------------------------------- matmul_multi_subgraphs

def test_matmul_multi_subgraphs_calls_each_graph_by_index(tmp_path):
    """MindSpore's matmul_multi_subgraphs: one model of two graph files, each called
    with ``model.call(..., subgraph=i)``. jax_export loads one file per model, so the
    graphs here come from a backend the servable registers, which loads each file as
    a graph (as the MindIR backend does)."""
    write_matmul_subgraphs(tmp_path)  # its servable_config.py registers the backend
    try:
        with serving(server.ServableStartConfig(str(tmp_path), "matmul", device_ids=(0,))) as url:
            instance = {"x": np.ones((128, 96), np.float32).tolist(), "y": np.ones((8, 96), np.float32).tolist()}
            result = requests.post(f"{url}/model/matmul:predict", data=json.dumps({"instances": [instance]}))
            result = json.loads(result.text)
            assert result == {"instances": [{"z": [128 * 48.0 + 8 * 48.0] * 16}]}
            result = requests.post(f"{url}/model/matmul:predict_bad", data=json.dumps({"instances": [instance]}))
            assert "Model(matmul_0.npz;matmul_1.npz, subgraph=2).call() failed: The model does not have subgraph of " \
                   "index 2, the subgraph count of the model is 2" in json.loads(result.text)["error_msg"]
    finally:
        unregister_backend("npz_matmul")
