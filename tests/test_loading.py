"""Loading servables: load errors are clear and raised by start_servables (never on
the request path), and the JAX model formats serve what the function computes.

The success cases share one server (loading and compiling is the slow part).
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orjson
import pytest
import requests

from support import BUNDLED, export_to, serving, spec, write_servable

from mserve import server
from mserve.errors import ServableLoadError

ADD_ARTIFACT = BUNDLED / "add" / "1" / "tensor_add.jaxexport"

SIMPLE_CONFIG = """
from mserve import register

model = register.declare_model(model_file="m.jaxexport", model_format="jax_export", with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x1, x2):
    return register.add_stage(model, x1, x2, outputs_count=1)
"""


@pytest.fixture(autouse=True)
def _clean_server():
    yield
    server.stop()


def load_error(root, name, **config) -> str:
    """start_servables must refuse the servable; returns the message."""
    with pytest.raises(ServableLoadError) as info:
        server.start_servables(server.ServableStartConfig(root, name, **config))
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert "Traceback" not in message
    return message


def simple(root, name="s", config=SIMPLE_CONFIG, files=None):
    return write_servable(root, name, config, {"1/m.jaxexport": ADD_ARTIFACT} if files is None else files)


def line_of(config: str, text: str) -> int:
    """1-based line of ``text`` in ``config`` once dedented, as write_servable writes it."""
    lines = textwrap.dedent(config).splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


# --------------------------------------------------------------------------- where things are


def test_missing_servable_directory(tmp_path):
    msg = load_error(tmp_path / "nowhere", "add")
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg


def test_missing_servable_folder(tmp_path):
    msg = load_error(tmp_path, "nosuch")
    assert "nosuch" in msg and "servable_config.py" in msg and "not found" in msg


def test_no_version_folder(tmp_path):
    simple(tmp_path, files={})
    msg = load_error(tmp_path, "s")
    assert "no version folder" in msg and str(tmp_path / "s") in msg


def test_requested_version_missing(tmp_path):
    simple(tmp_path)
    msg = load_error(tmp_path, "s", version_number=3)
    assert "version 3 not found" in msg and "present: 1" in msg
    msg = load_error(tmp_path, "s", version_number=[1, 2])
    assert "version 2 not found" in msg


def test_version_folders_that_are_not_numbers_are_ignored(tmp_path):
    folder = simple(tmp_path)
    (folder / "latest").mkdir()
    (folder / "__pycache__").mkdir()
    server.start_servables(server.ServableStartConfig(tmp_path, "s"))
    assert list(server.registry().servables()["s"].versions) == [1]


# --------------------------------------------------------------------------- servable_config.py itself


def test_servable_config_raising_names_file_and_line(tmp_path):
    config = """
    import numpy as np
    from mserve import register

    def helper():
        raise ValueError("bad config value")

    helper()
    """
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    config_path = tmp_path / "s" / "servable_config.py"
    assert "ValueError: bad config value" in msg
    assert f"{config_path}:{line_of(config, 'raise ValueError')}" in msg


def test_servable_config_import_error(tmp_path):
    simple(tmp_path, config="import no_such_module_for_mserve_tests\n")
    msg = load_error(tmp_path, "s")
    assert "no_such_module_for_mserve_tests" in msg and "servable_config.py:1" in msg


def test_servable_config_syntax_error_names_file_and_line(tmp_path):
    config = """
    from mserve import register

    def broken(:
        pass
    """
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "SyntaxError" in msg
    assert f"servable_config.py:{line_of(config, 'def broken')}" in msg


def test_servable_config_registering_nothing(tmp_path):
    simple(tmp_path, config="from mserve import register\n")
    assert "There is no method registered for servable" in load_error(tmp_path, "s")


def test_register_method_twice(tmp_path):
    config = SIMPLE_CONFIG + """

@register.register_method(output_names=["y"])
def predict(x1, x2):
    return register.add_stage(model, x1, x2, outputs_count=1)
"""
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "Method predict has been registered more than once." in msg
    lines = textwrap.dedent(config).splitlines()
    second = [i for i, line in enumerate(lines, 1) if "register_method" in line or "def predict" in line][2:]
    assert any(f"servable_config.py:{n})" in msg for n in second), msg


def test_method_returning_wrong_number_of_outputs(tmp_path):
    config = """
    from mserve import register

    model = register.declare_model(model_file="m.jaxexport", model_format="jax_export", with_batch_dim=False)


    @register.register_method(output_names=["y", "z"])
    def predict(x1, x2):
        return register.add_stage(model, x1, x2, outputs_count=1)
    """
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "Method return output size 1 not match registered 2" in msg and "predict" in msg


def test_add_stage_with_a_non_placeholder_argument(tmp_path):
    config = """
    from mserve import register

    def f(x):
        return x

    @register.register_method(output_names=["y"])
    def predict(x):
        return register.add_stage(f, 5, outputs_count=1)
    """
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "argument 0" in msg and f"servable_config.py:{line_of(config, 'add_stage(f, 5')}" in msg


def test_python_stage_wired_with_wrong_arity(tmp_path):
    config = """
    from mserve import register

    def one_input(x):
        return x

    @register.register_method(output_names=["y"])
    def predict(x1, x2):
        return register.add_stage(one_input, x1, x2, outputs_count=1)
    """
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "function one_input input args count 1 not match the count 2 registered in method" in msg
    assert f"servable_config.py:{line_of(config, 'add_stage(one_input')}" in msg


def test_batched_python_stage_must_take_one_argument(tmp_path):
    config = """
    from mserve import register

    def per_instance(x1, x2):
        return x1

    @register.register_method(output_names=["y"])
    def predict(x1, x2):
        return register.add_stage(per_instance, x1, x2, outputs_count=1, batch_size=4)
    """
    simple(tmp_path, config=config)
    assert "with batch_size set it is called with one argument, the list of instances" in load_error(tmp_path, "s")


# --------------------------------------------------------------------------- models


def test_model_file_missing(tmp_path):
    simple(tmp_path, files={"1/other.bin": b"x"})
    msg = load_error(tmp_path, "s")
    assert str(tmp_path / "s" / "1" / "m.jaxexport") in msg and "not found" in msg


def test_unknown_model_format(tmp_path):
    simple(tmp_path, config=SIMPLE_CONFIG.replace('model_format="jax_export"', 'model_format="TensorRT"'))
    msg = load_error(tmp_path, "s")
    assert "unknown model_format 'TensorRT'" in msg and "jax_export" in msg and "jax_function" in msg


def test_model_file_not_an_artifact(tmp_path):
    simple(tmp_path, files={"1/m.jaxexport": b"not a jax export"})
    msg = load_error(tmp_path, "s")
    assert "m.jaxexport" in msg and "not a jax.export artifact" in msg


def test_model_wired_with_wrong_number_of_inputs(tmp_path):
    config = SIMPLE_CONFIG.replace("add_stage(model, x1, x2,", "add_stage(model, x1,")
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "predict" in msg and "takes 2 inputs but add_stage wires 1" in msg


def test_model_wired_with_wrong_number_of_outputs(tmp_path):
    config = SIMPLE_CONFIG.replace("outputs_count=1", "outputs_count=2").replace(
        "return register.add_stage", "y, z = register.add_stage"
    ) + "    return y\n"
    simple(tmp_path, config=config)
    msg = load_error(tmp_path, "s")
    assert "predict" in msg and "has 1 outputs but add_stage says outputs_count=2" in msg


def test_model_stage_with_batch_size(tmp_path):
    simple(tmp_path, config=SIMPLE_CONFIG.replace("outputs_count=1", "outputs_count=1, batch_size=2"))
    assert "batch_size applies to Python stages only" in load_error(tmp_path, "s")


BATCH_CONFIG = """
from mserve import register

model = register.declare_model(model_file="m.jaxexport", model_format="jax_export"{extra})


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


@pytest.mark.parametrize(
    "fn, specs, extra, text",
    [
        (lambda x: jnp.sum(x), ["b, 3"], "", "output 0 (float32[]) does not lead with the batch dimension"),
        (lambda x: x[0], [(4, 3)], "", "output 0 (float32[3]) does not lead with the batch dimension (4)"),
        (lambda x: jnp.ones(3) * jnp.sum(x), ["b, 3"], "", "output 0 (float32[3])"),
        (lambda x: x, [()], "", "input 0 (float32[]) does not lead with the batch dimension"),
        (lambda x: x, ["b, 3"], ", without_batch_dim_inputs=[1]", "without_batch_dim_inputs [1] out of range"),
    ],
)
def test_model_without_the_batch_dimension_it_is_declared_with(tmp_path, fn, specs, extra, text):
    folder = write_servable(tmp_path, "s", BATCH_CONFIG.format(extra=extra))
    export_to(folder / "1" / "m.jaxexport", fn, *(spec(s) for s in specs))
    msg = load_error(tmp_path, "s")
    assert text in msg, msg


def test_jax_function_without_function_option(tmp_path):
    config = """
    from mserve import register

    model = register.declare_model(model_file="w.npz", model_format="jax_function",
                                   options={"input_specs": [("b, 4", "float32")]})

    @register.register_method(output_names=["y"])
    def predict(x):
        return register.add_stage(model, x, outputs_count=1)
    """
    buf = tmp_path / "w.npz"
    np.savez(buf, w=np.ones((4, 2), np.float32))
    simple(tmp_path, config=config, files={"1/w.npz": buf})
    assert "options['function']" in load_error(tmp_path, "s")


def test_jax_function_that_does_not_trace(tmp_path):
    config = """
    from mserve import register

    def predict_fn(params, x):
        return x @ params["w"]          # (b, 3) @ (4, 2): shapes do not fit

    model = register.declare_model(model_file="w.npz", model_format="jax_function",
                                   options={"function": predict_fn, "input_specs": [("b, 3", "float32")]})

    @register.register_method(output_names=["y"])
    def predict(x):
        return register.add_stage(model, x, outputs_count=1)
    """
    buf = tmp_path / "w.npz"
    np.savez(buf, w=np.ones((4, 2), np.float32))
    simple(tmp_path, config=config, files={"1/w.npz": buf})
    msg = load_error(tmp_path, "s")
    assert "predict_fn" in msg and "input_specs" in msg


def test_failed_load_leaves_the_loader_usable(tmp_path):
    simple(tmp_path, name="bad", config="raise RuntimeError('boom')\n")
    assert "boom" in load_error(tmp_path, "bad")
    simple(tmp_path, name="good")
    server.start_servables(server.ServableStartConfig(tmp_path, "good"))
    assert "good" in server.registry().servables()


# --------------------------------------------------------------------------- formats that serve


def _mlp(x):
    """A fixed little network: tanh(x W + b), plus the argmax as an int32 output."""
    w = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) / 10 - 0.5
    b = jnp.array([0.1, -0.2, 0.3], jnp.float32)
    y = jnp.tanh(x @ w + b)
    return y, jnp.argmax(y, axis=-1).astype(jnp.int32)


def _linear(params, x):
    return x @ params["w"] + params["b"]


EXPORT_CONFIG = """
from mserve import register

model = register.declare_model(model_file="mlp.jaxexport", model_format="jax_export")


@register.register_method(output_names=["y", "label"])
def predict(x):
    y, label = register.add_stage(model, x, outputs_count=2)
    return y, label
"""

FUNCTION_CONFIG = """
from mserve import register


def linear(params, x):
    return x @ params["w"] + params["b"]


model = register.declare_model(
    model_file="{file}",
    model_format="jax_function",
    options={{"function": linear, "input_specs": [("b, 4", "float32")]}},
)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""

# MindSpore Serving's example/tensor_add/add/servable_config.py, verbatim except the
# import line and the model file/format.
MINDSPORE_ADD_CONFIG = '''
import numpy as np
from mserve import register


def add_trans_datatype(x1, x2):
    """define preprocess, this example has two inputs and two outputs"""
    return x1.astype(np.float32), x2.astype(np.float32)


# when with_batch_dim is set to False, only 2x2 add is supported
# when with_batch_dim is set to True(default), Nx2 add is supported, while N is viewed as batch
# float32 inputs/outputs
model = register.declare_model(model_file="tensor_add.jaxexport", model_format="jax_export", with_batch_dim=False)


# register add_common method in add
@register.register_method(output_names=["y"])
def add_common(x1, x2):  # only support float32 inputs
    """method add_common data flow definition, only call model"""
    y = register.add_stage(model, x1, x2, outputs_count=1)
    return y


# register add_cast method in add
@register.register_method(output_names=["y"])
def add_cast(x1, x2):
    """method add_cast data flow definition, only preprocessing and call model"""
    x1, x2 = register.add_stage(add_trans_datatype, x1, x2, outputs_count=2)  # cast input to float32
    y = register.add_stage(model, x1, x2, outputs_count=1)
    return y
'''

WEIGHTS = {
    "w": (np.arange(8, dtype=np.float32).reshape(4, 2) - 3.5) / 4,
    "b": np.array([0.25, -1.5], np.float32),
}


def _predict(url, path, body):
    r = requests.post(url + path, data=orjson.dumps(body))
    assert r.headers["Content-Type"] == "application/json"
    assert r.status_code == 200, r.text
    return r.json()


def test_formats(tmp_path_factory):
    """jax_export round trip, jax_function with npz and safetensors weights, and
    MindSpore's own add servable_config.py, all served by one server."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("formats")
    write_servable(root, "mlp", EXPORT_CONFIG)
    export_to(root / "mlp/1/mlp.jaxexport", _mlp, spec("b, 4"))
    npz = root / "weights.npz"
    np.savez(npz, **WEIGHTS)
    write_servable(root, "linear_npz", FUNCTION_CONFIG.format(file="weights.npz"), {"1/weights.npz": npz})
    st = root / "weights.safetensors"
    save_file(WEIGHTS, str(st))
    write_servable(root, "linear_st", FUNCTION_CONFIG.format(file="weights.safetensors"), {"1/weights.safetensors": st})
    write_servable(root, "add", MINDSPORE_ADD_CONFIG, {"1/tensor_add.jaxexport": ADD_ARTIFACT})
    configs = [server.ServableStartConfig(root, name) for name in ("mlp", "linear_npz", "linear_st", "add")]

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    with serving(configs) as url:
        # jax_export: export -> serve -> compare with calling the function directly
        got = _predict(url, "/model/mlp:predict", {"instances": [{"x": row.tolist()} for row in x]})
        want_y, want_label = jax.jit(_mlp)(x)
        assert np.allclose([g["y"] for g in got["instances"]], np.asarray(want_y), rtol=1e-6, atol=1e-6)
        assert [g["label"] for g in got["instances"]] == np.asarray(want_label).tolist()

        # jax_function: the function from servable_config.py with its weights file
        want = np.asarray(jax.jit(_linear)(WEIGHTS, x))
        for name in ("linear_npz", "linear_st"):
            got = _predict(url, f"/model/{name}:predict", {"instances": [{"x": row.tolist()} for row in x]})
            assert np.allclose([g["y"] for g in got["instances"]], want, rtol=1e-6, atol=1e-6), name

        # MindSpore Serving's add example, ported by its import line and model file/format
        body = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}
        assert _predict(url, "/model/add:add_common", body) == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
        ints = {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}]}
        assert _predict(url, "/model/add:add_cast", ints) == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
