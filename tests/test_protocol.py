"""Every rule of PROTOCOL.md against one real server (Waitress on a free port).

One server is started for the whole module, serving several servables at once:

* ``add``    the bundled MindSpore example (2x2 float32, no batch dimension);
* ``codec``  Python-only stages that echo, describe or produce values, for the wire
             codec in both directions;
* ``stages`` a pre -> model -> post pipeline and Python stages with every batch_size,
             plus Model.call from Python stages;
* ``models`` batched model stages: symbolic batch, fixed batch 4, without_batch_dim_inputs;
* ``ver``    two versions loaded at once (``version_number=[1, 2]``).

The server runs with ``max_msg_mb_size=1`` so the body-size rules are cheap to test.
"""

from __future__ import annotations

import base64
import socket
import time
from urllib.parse import urlsplit

import jax.numpy as jnp
import numpy as np
import orjson
import pytest
import requests

from support import ADD_BODY, BUNDLED, export_to, serving, spec, write_servable

from mserve import server

LIMIT = 1024 * 1024  # max_msg_mb_size=1

CODEC_CONFIG = """
import numpy as np
from mserve import register


def echo(x):
    return x


def describe(x):
    if isinstance(x, np.ndarray):
        return f"ndarray {x.dtype.name} {list(x.shape)}"
    return type(x).__name__


OUTPUTS = {
    "bytes": lambda: b"\\x00\\x01hi",
    "str": lambda: "h\\u00e9llo",
    "pyfloat": lambda: 1.0,
    "pyint": lambda: 7,
    "f32": lambda: np.float32(3.2),
    "bool": lambda: np.bool_(True),
    "bools": lambda: np.array([[True, False]]),
    "strarray": lambda: np.array("s0"),
    "object": lambda: object(),
    "bigint": lambda: 2 ** 70,
}


def make(kind):
    return OUTPUTS[kind]()


@register.register_method(output_names=["y"])
def echo_value(x):
    return register.add_stage(echo, x, outputs_count=1)


@register.register_method(output_names=["y"])
def describe_value(x):
    return register.add_stage(describe, x, outputs_count=1)


@register.register_method(output_names=["y"])
def make_value(kind):
    return register.add_stage(make, kind, outputs_count=1)


@register.register_method(output_names=["a", "b"])
def two_inputs(a, b):
    return a, b


def one_value(x):
    return x


def short_batch(instances):
    return [x for (x,) in instances][:-1]


@register.register_method(output_names=["a", "b"])
def wrong_output_count(x):
    a, b = register.add_stage(one_value, x, outputs_count=2, tag="Pair")
    return a, b


@register.register_method(output_names=["y"])
def wrong_result_count(x):
    return register.add_stage(short_batch, x, outputs_count=1, batch_size=0, tag="Short")
"""

STAGES_CONFIG = """
import time

import numpy as np
from mserve import register

model = register.declare_model(model_file="times10.jaxexport", model_format="jax_export", with_batch_dim=True)


def check(x):
    if float(x) < 0:
        raise ValueError("negative input")
    if float(x) == 13:
        raise ValueError(f"unlucky {float(x)}")
    return np.asarray(x * 2)


def double_scalar(x):
    return x * 2  # numpy arithmetic on a 0-d array gives a numpy scalar (np.float32)


def plus_one(y):
    if float(y) > 1000:
        raise ValueError("too large")
    return y + 1


def per_instance(x):
    assert isinstance(x, np.ndarray) and x.ndim == 0, f"got {type(x).__name__}"
    return x + 1


def batched(instances):
    n = len(instances)
    return [(x + 1, np.int32(n)) for (x,) in instances]


def batched_raises(instances):
    if any(float(x) < 0 for (x,) in instances):
        raise ValueError("negative in batch")
    return [x for (x,) in instances]


def sleep_for(x):
    time.sleep(float(x))
    return x


def call_one(x):
    return model.call(x) + 1


def call_many(instances):
    outs = model.call([(x,) for (x,) in instances])  # one tuple of outputs per instance
    return [inst[0] + 1 for inst in outs]


@register.register_method(output_names=["y"])
def pre_post(x):
    x = register.add_stage(check, x, outputs_count=1, tag="Preprocess")
    y = register.add_stage(model, x, outputs_count=1)
    y = register.add_stage(plus_one, y, outputs_count=1, tag="Postprocess")
    return y


@register.register_method(output_names=["y"])
def scalar_to_model(x):
    x = register.add_stage(double_scalar, x, outputs_count=1)
    return register.add_stage(model, x, outputs_count=1)


@register.register_method(output_names=["y"])
def batch_none(x):
    return register.add_stage(per_instance, x, outputs_count=1, batch_size=None)


@register.register_method(output_names=["y", "n"])
def batch_all(x):
    return register.add_stage(batched, x, outputs_count=2, batch_size=0)


@register.register_method(output_names=["y", "n"])
def batch_two(x):
    return register.add_stage(batched, x, outputs_count=2, batch_size=2)


@register.register_method(output_names=["y"])
def batch_two_raises(x):
    return register.add_stage(batched_raises, x, outputs_count=1, batch_size=2, tag="Batchstage")


@register.register_method(output_names=["y"])
def slow(x):
    x = register.add_stage(sleep_for, x, outputs_count=1)
    return register.add_stage(plus_one, x, outputs_count=1)


@register.register_method(output_names=["y"])
def model_call_one(x):
    return register.add_stage(call_one, x, outputs_count=1)


@register.register_method(output_names=["y"])
def model_call_many(x):
    return register.add_stage(call_many, x, outputs_count=1, batch_size=0)
"""

MODELS_CONFIG = """
from mserve import register

sym = register.declare_model(model_file="sym.jaxexport", model_format="jax_export")
fixed = register.declare_model(model_file="fixed4.jaxexport", model_format="jax_export")
bias = register.declare_model(model_file="bias.jaxexport", model_format="jax_export",
                              without_batch_dim_inputs=[1])


@register.register_method(output_names=["y", "n"])
def symbolic(x):
    return register.add_stage(sym, x, outputs_count=2)


@register.register_method(output_names=["y", "n"])
def fixed_batch(x):
    return register.add_stage(fixed, x, outputs_count=2)


@register.register_method(output_names=["y"])
def add_bias(x, b):
    return register.add_stage(bias, x, b, outputs_count=1)
"""

VER_CONFIG = """
from mserve import register

model = register.declare_model(model_file="inc.jaxexport", model_format="jax_export", with_batch_dim=False)


@register.register_method(output_names=["y"])
def inc(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def _double_and_count(x):
    """2*x, and per row the batch size the model was called with."""
    ones = jnp.ones_like(x[:, 0])
    return x * 2, ones * jnp.sum(ones)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    write_servable(root, "codec", CODEC_CONFIG)
    (root / "codec/1").mkdir()  # a version folder with no model files
    write_servable(root, "stages", STAGES_CONFIG)
    export_to(root / "stages/1/times10.jaxexport", lambda x: x * 10, spec("b"))
    write_servable(root, "models", MODELS_CONFIG)
    export_to(root / "models/1/sym.jaxexport", _double_and_count, spec("b, 3"))
    export_to(root / "models/1/fixed4.jaxexport", _double_and_count, spec((4, 3)))
    export_to(root / "models/1/bias.jaxexport", lambda x, b: x + b, spec("b, 3"), spec((3,)))
    write_servable(root, "ver", VER_CONFIG)
    export_to(root / "ver/1/inc.jaxexport", lambda x: x + 1, spec((2,)))
    export_to(root / "ver/2/inc.jaxexport", lambda x: x + 2, spec((2,)))
    configs = [
        server.ServableStartConfig(BUNDLED, "add"),
        server.ServableStartConfig(root, "codec"),
        server.ServableStartConfig(root, "stages"),
        server.ServableStartConfig(root, "models"),
        server.ServableStartConfig(root, "ver", version_number=[1, 2]),
    ]
    with serving(configs, max_msg_mb_size=1) as base:
        yield base


# --------------------------------------------------------------------------- helpers


def post(url: str, path: str, body) -> requests.Response:
    """POST ``body`` (a JSON-able object, or raw str/bytes) and check what every reply
    must be: application/json, a JSON object, never a stack trace."""
    data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    r = requests.post(url + path, data=data)
    check_reply(r)
    return r


def check_reply(r: requests.Response) -> None:
    assert r.headers["Content-Type"] == "application/json", r.headers
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    assert isinstance(r.json(), dict)


def expect_error(r: requests.Response, status: int, *texts: str) -> str:
    """A whole-request error: ``{"error_msg": ...}`` alone, containing ``texts``."""
    body = r.json()
    assert r.status_code == status, (r.status_code, body)
    assert list(body) == ["error_msg"], body
    for text in texts:
        assert text in body["error_msg"], (text, body)
    return body["error_msg"]


def one(url: str, method: str, **inputs):
    """One instance on the codec servable; returns the response."""
    return post(url, f"/model/codec:{method}", {"instances": [inputs]})


def echo(url: str, value):
    r = one(url, "echo_value", x=value)
    assert r.status_code == 200, r.text
    return r


def echoed(url: str, value):
    return echo(url, value).json()["instances"][0]["y"]


def described(url: str, value) -> str:
    r = one(url, "describe_value", x=value)
    assert r.status_code == 200, r.text
    return r.json()["instances"][0]["y"]


def value_error(url: str, value, *texts: str) -> str:
    """A value that fails decoding: 400, a single error naming the MindSpore text."""
    return expect_error(one(url, "echo_value", x=value), 400, *texts)


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def tensor(array: np.ndarray, type_name: str | None = None, shape=None) -> dict:
    obj = {"b64": b64(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())}
    obj["type"] = type_name or ("bool" if array.dtype == np.bool_ else array.dtype.name)
    obj["shape"] = list(array.shape) if shape is None else shape
    return obj


def instances(*values, name="x"):
    return {"instances": [{name: v} for v in values]}


# --------------------------------------------------------------------------- 1. URL


ADD_Y = [[2.0, 4.0], [6.0, 8.0]]


@pytest.mark.parametrize(
    "path",
    [
        "/model/add:add_common",
        "/model/add/version/0:add_common",
        "/model/add/version/1:add_common",
        "/version/1/model/add:add_common",
        "/version/0/model/add:add_common",
    ],
)
def test_url_forms_reach_the_method(url, path):
    r = post(url, path, ADD_BODY)
    assert r.status_code == 200
    assert r.json() == {"instances": [{"y": ADD_Y}]}


@pytest.mark.parametrize(
    "path, status, text",
    [
        ("/foo/add:add_common", 400, "please check url, the keyword:[model] must contain"),
        ("/x/:add_common", 400, "please check url, the keyword:[model] must contain"),
        ("/version/1:add_common", 400, "please check url, the keyword:[model] must contain"),
        ("/", 400, "please check url, the keyword:[model] must contain"),
        ("/model/add", 400, "please check url, the keyword:[service method] must contain."),
        ("/model/add:", 400, "please check url, the keyword:[service method] must contain."),
        ("/model/add/version/1", 400, "please check url, the keyword:[service method] must contain."),
        ("/model/add/version/-1:add_common", 400, "please check url, version number range failed"),
        ("/model/add/version/99999999999999999999:add_common", 400, "please check url, version number range failed"),
        ("/model/add/version/4294967295:add_common", 400, "please check url, version number range failed"),
        ("/model/add/version/4294967294:add_common", 404, "servable is not available"),
        ("/model/add/version:add_common", 400, "please check url, the keyword:[version] value invalid"),
        ("/model/:add_common", 400, "please check url, the keyword:[model] must contain"),
        ("/version/1/model:add_common", 400, "please check url, the keyword:[model] must contain"),
        ("/model/add/version/abc:add_common", 400, "please check url, the keyword:[version] value invalid"),
        ("/model/add/version/1.5:add_common", 400, "please check url, the keyword:[version] value invalid"),
        ("/model/add/version/:add_common", 400, "please check url, the keyword:[version] value invalid"),
        ("/model/add/version/2:add_common", 404, "servable is not available"),
        ("/version/2/model/add:add_common", 404, "servable is not available"),
        ("/model/nosuch:add_common", 404, "servable is not available"),
        ("/model/add:nosuch", 404, "method is not available"),
        ("/model/add/version/2:nosuch", 404, "servable is not available"),
    ],
)
def test_url_errors(url, path, status, text):
    expect_error(post(url, path, ADD_BODY), status, text)


def test_unknown_servable_and_method_messages_name_them(url):
    msg = expect_error(post(url, "/model/nosuch:add_common", ADD_BODY), 404)
    assert "nosuch" in msg and "add_common" in msg
    msg = expect_error(post(url, "/model/add:add_nonexist", ADD_BODY), 404)
    assert "add" in msg and "add_nonexist" in msg


@pytest.mark.parametrize("verb", ["GET", "PUT", "DELETE", "PATCH"])
def test_only_post_predicts(url, verb):
    r = requests.request(verb, url + "/model/add:add_common", data=orjson.dumps(ADD_BODY))
    check_reply(r)
    expect_error(r, 405, "http message only support POST right now")


def test_versions_selected_by_url(url):
    """Two versions loaded (version_number=[1, 2]); absent or 0 means the newest."""
    body = instances([1.0, 2.0])
    expected = {
        "/model/ver:inc": [3.0, 4.0],
        "/model/ver/version/0:inc": [3.0, 4.0],
        "/model/ver/version/1:inc": [2.0, 3.0],
        "/model/ver/version/2:inc": [3.0, 4.0],
        "/version/1/model/ver:inc": [2.0, 3.0],
        "/version/2/model/ver:inc": [3.0, 4.0],
    }
    for path, y in expected.items():
        r = post(url, path, body)
        assert r.status_code == 200, (path, r.text)
        assert r.json() == {"instances": [{"y": y}]}, path
    expect_error(post(url, "/model/ver/version/3:inc", body), 404, "servable is not available")


def test_several_servables_in_one_server(url):
    assert post(url, "/model/add:add_cast", ADD_BODY).json() == {"instances": [{"y": ADD_Y}]}
    assert echoed(url, 5) == 5
    assert post(url, "/model/stages:pre_post", instances(1.0)).json() == {"instances": [{"y": 21.0}]}
    assert post(url, "/model/ver:inc", instances([0.0, 0.0])).json() == {"instances": [{"y": [2.0, 2.0]}]}


# --------------------------------------------------------------------------- 2. body


@pytest.mark.parametrize(
    "body",
    [
        b"hello",
        b'{"instances":[{"x1":[[1.0,2.0],[3.0,4.0]],"x2":[[1.0,2.0],[3.0,4.0]]}',
        b"",
        b'{"instances": [1,]}',
    ],
)
def test_body_not_json(url, body):
    expect_error(post(url, "/model/add:add_common", body), 400, "Illegal JSON format")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"instances"', b"3", b"null"])
def test_body_not_an_object(url, body):
    # what the real server answers (MindSpore's JSON library finds no key in a non-object)
    expect_error(
        post(url, "/model/add:add_common", body),
        400,
        "Parser request failed, key 'instances' expects to exist once, but actually 0 times",
    )


def test_instances_absent(url):
    expect_error(
        post(url, "/model/add:add_common", {"x1": [[1.0, 2.0], [3.0, 4.0]]}),
        400,
        "key 'instances' expects to exist once, but actually 0 times",
    )


def test_instances_empty(url):
    expect_error(
        post(url, "/model/add:add_common", {"instances": []}), 400, "instances value is array type, but no value"
    )


def test_instances_single_object_is_one_instance(url):
    r = post(url, "/model/add:add_common", {"instances": ADD_BODY["instances"][0]})
    assert r.status_code == 200
    assert r.json() == {"instances": [{"y": ADD_Y}]}


@pytest.mark.parametrize("value", [5, "x", None, True, [1], [[1, 2]], ["x", {"x": 1}]])
def test_instances_not_a_list_of_objects(url, value):
    expect_error(
        post(url, "/model/add:add_common", {"instances": value}),
        400,
        "Parser request failed, instances no key mode is not supported",
    )


@pytest.mark.parametrize(
    "instances, text",
    [
        ([ADD_BODY["instances"][0], 1], "Parser request failed, json array, instance is not object type"),
        ([ADD_BODY["instances"][0], {}], "Parser request failed, json array, instance is object type, but no value"),
        ({}, "Parser request failed, json object, value is empty"),
        ([dict(ADD_BODY["instances"][0], **{"": 1})], "Parser request failed, string key is empty"),
    ],
)
def test_instance_not_an_object_empty_or_with_an_empty_key(url, instances, text):
    expect_error(post(url, "/model/add:add_common", {"instances": instances}), 400, text)


def test_input_missing_names_input_servable_and_method(url):
    r = post(url, "/model/add:add_common", {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]]}]})
    msg = expect_error(r, 400, "Cannot find input x2 in instance input")
    assert "add" in msg.split("instance input", 1)[1] and "add_common" in msg


def test_extra_input_is_ignored(url):
    body = {"instances": [dict(ADD_BODY["instances"][0], x3=1)]}
    r = post(url, "/model/add:add_common", body)
    assert r.status_code == 200
    assert r.json() == {"instances": [{"y": ADD_Y}]}


def test_several_instances_in_request_order(url):
    body = {
        "instances": [
            ADD_BODY["instances"][0],
            {"x1": [[0.5, 0.5], [0.5, 0.5]], "x2": [[1.5, 1.5], [1.5, 1.5]]},
        ]
    }
    r = post(url, "/model/add:add_common", body)
    assert r.json() == {"instances": [{"y": ADD_Y}, {"y": [[2.0, 2.0], [2.0, 2.0]]}]}


def test_outputs_keyed_by_output_names(url):
    r = post(url, "/model/codec:two_inputs", {"instances": [{"a": 1, "b": "s"}]})
    assert r.json() == {"instances": [{"a": 1, "b": "s"}]}


# --------------------------------------------------------------------------- 2.1 plain JSON values


@pytest.mark.parametrize(
    "value, description",
    [
        (5, "ndarray int32 []"),
        (-2147483648, "ndarray int32 []"),
        (2147483647, "ndarray int32 []"),
        (1.5, "ndarray float32 []"),
        (True, "ndarray bool []"),
        (False, "ndarray bool []"),
        ("hello", "str"),
        (["hello"], "str"),
        ([1, 2, 3], "ndarray int32 [3]"),
        ([[1, 2], [3, 4], [5, 6]], "ndarray int32 [3, 2]"),
        ([[1.0, 2.5]], "ndarray float32 [1, 2]"),
        ([[[True], [False]]], "ndarray bool [1, 2, 1]"),
        ([7], "ndarray int32 [1]"),
    ],
)
def test_plain_value_kinds_reach_stages_as(url, value, description):
    assert described(url, value) == description


@pytest.mark.parametrize(
    "value",
    [5, -2147483648, 2147483647, 1.5, True, False, "h\u00e9llo", [1, 2, 3], [[1, 2], [3, 4]], [[0.5, 2.0]], [True]],
)
def test_plain_values_round_trip(url, value):
    assert echoed(url, value) == value


def test_single_string_list_is_a_scalar(url):
    assert echoed(url, ["s"]) == "s"


@pytest.mark.parametrize("value", [2147483648, -2147483649, [1, 2147483648], [[-2147483649]], [18446744073709551615]])
def test_int_out_of_int32_range(url, value):
    value_error(url, value, "int32")


def test_empty_array(url):
    value_error(url, [], "Parser request failed, json array, shape is empty")
    # the shape stops at the empty list, and the element type is never found (the real server's text)
    value_error(url, [[]], "Parser request failed, json array, data type is unknown")
    value_error(url, [[1, 2], []], "invalid json array: json size is 0, the dim 1 expected to be 2")


@pytest.mark.parametrize(
    "value, text",
    [
        ([[1, 2], [3]], "invalid json array: json size is 1, the dim 1 expected to be 2"),
        ([[1.0, 2.0], [3.0]], "invalid json array: json size is 1, the dim 1 expected to be 2"),
        ([[1], [2, 3]], "invalid json array: json size is 2, the dim 1 expected to be 1"),
        ([[[1, 2], [3, 4]], [[5, 6], [7]]], "invalid json array: json size is 1, the dim 2 expected to be 2"),
        ([[[1, 2], [3, 4]], [[5, 6]]], "invalid json array: json size is 1, the dim 1 expected to be 2"),
    ],
)
def test_ragged_array_names_sizes_and_dim(url, value, text):
    value_error(url, value, text)


@pytest.mark.parametrize(
    "value, text",
    [
        ([1, [2]], "json array, data should be number, bool, string or bytes"),
        ([1, [2, 3]], "json array, data should be number, bool, string or bytes"),
        ([[1], 2], "invalid json array: json type is not array"),
        ([[1, 2], 3], "invalid json array: json type is not array"),
        ([True, {"b64": "AAAA"}], "json array, data should be number, bool, string or bytes"),
    ],
)
def test_array_mixing_scalars_and_arrays(url, value, text):
    value_error(url, value, "Parser request failed, " + text)


@pytest.mark.parametrize(
    "value", [[1, 2.5], [2.5, 1], [True, 1], [1, True], [1, "a"], [[1.0], [True]], [[1, 2], [3, 4.0]], [1.0, "a"]]
)
def test_array_leaves_of_different_kinds(url, value):
    value_error(url, value, "json array, elements type is not equal")


def test_array_with_null(url):
    value_error(url, [1, None], "json array, data should be number, bool, string or bytes")
    value_error(url, [None], "json array, data type is unknown")
    value_error(url, None, "Parser request failed, json value is null, it is not supported")


@pytest.mark.parametrize(
    "value", [["a", "b"], [{"b64": b64("a")}, {"b64": b64("b")}], ["a", 1.0], [{"b64": b64("a")}, 1]]
)
def test_strings_or_bytes_in_arrays_only_one_item(url, value):
    # checked before any other leaf: ["a", 1.0] fails here, not as "elements type is not equal"
    value_error(url, value, "Parser request failed, json array, string or bytes type only support one item")


@pytest.mark.parametrize(
    "value, text",
    [
        ([{"b64": b64(b"\0" * 4), "type": "int32"}], "json array, item is object type, object only support string or bytes type"),
        ([{"b64": "AAAA", "type": "foo"}], "json array, data type is unknown"),
    ],
)
def test_b64_objects_in_arrays(url, value, text):
    value_error(url, value, "Parser request failed, " + text)
    assert described(url, [{"b64": b64("h\u00e9"), "type": "str"}]) == "str"


@pytest.mark.parametrize("value", [[["s"]], [[{"b64": b64("s")}]], {"b64": b64("s"), "type": "bytes", "shape": [1, 1]}])
def test_str_or_bytes_shaped_other_than_1_fails_the_input_check(url, value):
    """Parsed fine, then refused by the method's input check (a whole-request error)."""
    value_error(
        url,
        value,
        "Instances input x check failed, detail: Instance tensor check failed: bytes or string type input  shape can"
        " only be (1,) or empty, but given shape is [1, 1]",
    )


def test_parse_errors_name_instance_and_input_after_mindspores_text(url):
    r = post(url, "/model/codec:two_inputs", {"instances": [{"a": 1, "b": 1}, {"a": 1, "b": [[1], [2, 3]]}]})
    msg = expect_error(r, 400)
    assert msg == "Parser request failed, invalid json array: json size is 2, the dim 1 expected to be 1 (instance 1, input 'b')"


# --------------------------------------------------------------------------- 2.2 base64 objects

B64_TYPES = {
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float16": np.float16,
    "fp16": np.float16,
    "float32": np.float32,
    "fp32": np.float32,
    "float64": np.float64,
    "fp64": np.float64,
    "bool": np.bool_,
}


@pytest.mark.parametrize("type_name", list(B64_TYPES))
def test_b64_each_type_and_alias(url, type_name):
    dtype = np.dtype(B64_TYPES[type_name])
    array = (np.arange(6) % 2 == 0) if dtype == np.bool_ else np.arange(6).astype(dtype)
    array = array.reshape(2, 3)
    obj = tensor(array, type_name)
    assert described(url, obj) == f"ndarray {dtype.name} [2, 3]"
    assert echoed(url, obj) == array.tolist()


def test_b64_little_endian_c_order(url):
    # the MindSpore documentation's int16 example (its text says [[1,1],[2,3],[3,4]],
    # but the bytes 01 00 02 00 02 00 03 00 03 00 04 00 are [[1,2],[2,3],[3,4]])
    obj = {"b64": "AQACAAIAAwADAAQA", "type": "int16", "shape": [3, 2]}
    assert echoed(url, obj) == [[1, 2], [2, 3], [3, 4]]
    assert echoed(url, {"b64": b64(b"\x01\x02\x00\x00"), "type": "int32", "shape": []}) == 0x0201


def test_b64_str(url):
    obj = {"b64": b64("h\u00e9llo"), "type": "str"}
    assert described(url, obj) == "str"
    assert echoed(url, obj) == "h\u00e9llo"
    assert echoed(url, dict(obj, shape=[1])) == "h\u00e9llo"
    assert echoed(url, dict(obj, shape=[])) == "h\u00e9llo"


def test_b64_str_not_utf8(url):
    value_error(url, {"b64": b64(b"\xff\xfe"), "type": "str"}, "UTF-8")


def test_b64_default_type_is_bytes(url):
    obj = {"b64": b64(b"\x00\x01\xff")}
    assert described(url, obj) == "ndarray uint8 [3]"
    # passed straight through, bytes stay bytes (MindSpore keeps the type)
    assert echoed(url, obj) == {"b64": b64(b"\x00\x01\xff")}
    assert echoed(url, [dict(obj, type="bytes", shape=[1])]) == {"b64": b64(b"\x00\x01\xff")}
    assert described(url, dict(obj, type="bytes")) == "ndarray uint8 [3]"
    assert described(url, dict(obj, type="bytes", shape=[1])) == "ndarray uint8 [3]"
    assert described(url, [obj]) == "ndarray uint8 [3]"


def test_b64_without_shape_is_a_scalar(url):
    obj = {"b64": b64(np.int32(7).tobytes()), "type": "int32"}
    assert described(url, obj) == "ndarray int32 []"
    assert echoed(url, obj) == 7
    value_error(url, dict(obj, b64=b64(b"\0" * 8)), "size is not matched, decode base64 size:8; Given info: "
                "type:int32; type size:4; element nums:1")


def test_b64_shape_empty_is_0d(url):
    obj = {"b64": b64(np.int32(7).tobytes()), "type": "int32", "shape": []}
    assert described(url, obj) == "ndarray int32 []"
    assert echoed(url, obj) == 7


@pytest.mark.parametrize("shape, expected", [([0], []), ([1, 0], [[]]), ([2, 0], [[], []])])
def test_b64_zero_size_shapes(url, shape, expected):
    obj = {"b64": "", "type": "float32", "shape": shape}
    assert described(url, obj) == f"ndarray float32 {shape}"
    assert echoed(url, obj) == expected


@pytest.mark.parametrize(
    "obj",
    [
        {"b64": b64(b"\x00" * 6), "type": "int32", "shape": [2]},
        {"b64": b64(b"\x00" * 8), "type": "int32"},
        {"b64": b64(b"\x00" * 3), "type": "float16", "shape": [1]},
        {"b64": "", "type": "int8"},
    ],
)
def test_b64_size_mismatch(url, obj):
    value_error(url, obj, "size is not matched")


@pytest.mark.parametrize("data", ["!!!!", "AQA", "AQACAA=A", "\u00e9\u00e9\u00e9\u00e9"])
def test_b64_not_base64(url, data):
    value_error(url, {"b64": data, "type": "int8", "shape": [2]}, "is illegal b64 encode string")


def test_b64_missing(url):
    value_error(url, {"type": "int32", "shape": [1]}, "'b64' should be specified only one time")


@pytest.mark.parametrize("data", [5, None, ["AA=="], {"b64": "AA=="}])
def test_b64_not_string(url, data):
    value_error(url, {"b64": data}, "get scalar data failed, type is string, but json is not string type")


@pytest.mark.parametrize("type_value", [5, None, ["int8"]])
def test_b64_type_not_string(url, type_value):
    value_error(url, {"b64": "AA==", "type": type_value}, "json object, key is 'type', value should be string type")


@pytest.mark.parametrize("type_name", ["int128", "float", "INT8", ""])
def test_b64_type_unknown(url, type_name):
    value_error(url, {"b64": "AA==", "type": type_name}, f"json object, specified type:'{type_name}' is illegal")


@pytest.mark.parametrize("shape", [[-1], [1.5], [True], [[2]], ["1"]])
def test_b64_shape_not_unsigned_ints(url, shape):
    value_error(
        url,
        {"b64": "AA==", "type": "int8", "shape": shape},
        "json object, key is 'shape', array value should be unsigned integer",
    )


@pytest.mark.parametrize("shape", ["2", 2, None, {"a": 1}])
def test_b64_shape_not_a_list(url, shape):
    value_error(url, {"b64": "AA==", "type": "int8", "shape": shape}, "json object, key is 'shape', value should be array type")


@pytest.mark.parametrize("shape", [[0, 1], [1, 2, 0, 1], [2, 0, 0]])
def test_b64_shape_with_dims_after_a_zero(url, shape):
    text = "Parser request failed, json object, key is 'shape', invalid shape value " + orjson.dumps(shape).decode()
    value_error(url, {"b64": "", "type": "int8", "shape": shape}, text)


def test_b64_shape_dim_beyond_int32_reads_as_negative(url):
    """MindSpore reads each dimension as an int32 (the real server's answer)."""
    value_error(
        url,
        {"b64": "AAAA", "type": "int32", "shape": [4294967295]},
        "json object, key is 'shape', number value should not be negative number, shape value: [4294967295]",
    )


@pytest.mark.parametrize(
    "obj, text",
    [
        ({}, "json object, value is empty"),
        ({"b64": "AAAA", "type": "int32", "shape": [1], "z": 1}, "json object, items size is more than 3, only support specified ['b64', 'type', 'shape']"),
        ({"b64": "AAAA", "a": 1}, "json object, key is not ['b64', 'type', 'shape'], fail key:a"),
        # keys are checked in sorted order: shape before type
        ({"b64": "AAAA", "type": "foo", "shape": [0, 1]}, "json object, key is 'shape', invalid shape value [0,1]"),
        ({"type": "foo", "z": 1}, "json object, specified type:'foo' is illegal"),
        ({"b64": "AAAA", "type": "fp32", "shape": [2]}, "size is not matched, decode base64 size:3; Given info: type:float32; type size:4; element nums:2"),
    ],
)
def test_b64_object_checks_in_mindspores_order(url, obj, text):
    value_error(url, obj, "Parser request failed, " + text)


@pytest.mark.parametrize("type_name", ["str", "bytes"])
@pytest.mark.parametrize("shape", [[2], [1, 2], [0]])
def test_b64_str_bytes_more_than_one_element(url, type_name, shape):
    value_error(
        url,
        {"b64": b64("ab"), "type": type_name, "shape": shape},
        "json object, only support scalar when data type is string or bytes, please check 'type' or 'shape'",
    )


@pytest.mark.parametrize(
    "obj",
    [
        # shapes no tensor can have: dims after a 0, and 2**32 read as 0 by MindSpore
        {"b64": "", "type": "int8", "shape": [0, 2**63]},
        {"b64": "", "type": "int8", "shape": [2**32, 2**32]},
    ],
)
def test_b64_invalid_shape_value(url, obj):
    value_error(url, obj, "json object, key is 'shape', invalid shape value")


def test_b64_zero_size_with_data_is_a_size_mismatch(url):
    """The real server's answer (PROTOCOL.md 2.2 had ``invalid shape value``)."""
    obj = {"b64": b64(b"\x00" * 4), "type": "int32", "shape": [0]}
    value_error(url, obj, "size is not matched, decode base64 size:4; Given info: type:int32; type size:4; element nums:0")


# --------------------------------------------------------------------------- 2.3 order and scope


X = [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    "path, body, status, text",
    [
        # the JSON syntax first, then the URL, then the body
        ("/foo/add:add_common", b"hello", 400, "Illegal JSON format"),
        ("/foo/add:add_common", b"{}", 400, "please check url, the keyword:[model] must contain."),
        # the whole body is parsed before the servable and method are looked up
        ("/model/nosuch:add_common", {"instances": [{"x1": None, "x2": X}]}, 400,
         "Parser request failed, json value is null, it is not supported"),
        ("/model/add:nosuch", {"instances": [{"x1": [], "x2": X}]}, 400, "Parser request failed, json array, shape is empty"),
        ("/model/nosuch:add_common", {"instances": []}, 400, "Parser request failed, instances value is array type, but no value"),
        ("/model/nosuch:add_common", ADD_BODY, 404, "servable is not available"),
    ],
)
def test_json_then_url_then_body_then_lookup(url, path, body, status, text):
    expect_error(post(url, path, body), status, text)


def test_an_instance_is_parsed_in_sorted_key_order(url):
    # MindSpore's JSON objects keep their keys sorted: x1 fails first
    r = post(url, "/model/add:add_common", {"instances": [{"x2": None, "x1": []}]})
    expect_error(r, 400, "Parser request failed, json array, shape is empty (instance 0, input 'x1')")


def test_keys_that_are_not_inputs_are_parsed_too(url):
    r = post(url, "/model/add:add_common", {"instances": [dict(ADD_BODY["instances"][0], x3=None)]})
    expect_error(r, 400, "Parser request failed, json value is null, it is not supported (instance 0, input 'x3')")
    # ... but not checked against the method
    shaped = {"b64": "AAAA", "type": "bytes", "shape": [1, 1]}
    r = post(url, "/model/add:add_common", {"instances": [dict(ADD_BODY["instances"][0], x3=shaped)]})
    assert r.json() == {"instances": [{"y": ADD_Y}]}


def test_parse_error_in_a_later_instance_wins_over_a_missing_input(url):
    body = {"instances": [{"x1": X}, {"x1": None, "x2": X}]}
    expect_error(post(url, "/model/add:add_common", body), 400, "Parser request failed, json value is null")


@pytest.mark.parametrize("depth", [65, 100, 1000])
def test_nesting_deeper_than_a_tensor_can_have_is_a_clean_400(url, depth):
    body = b'{"instances":[{"x":' + b"[" * depth + b"1.0" + b"]" * depth + b"}]}"
    msg = expect_error(post(url, "/model/codec:echo_value", body), 400, "Parser request failed, json array, shape has")
    assert f"{depth} dimensions" in msg
    # as many dims in a b64 shape
    obj = {"b64": b64(b"\0" * 4), "type": "int32", "shape": [1] * depth}
    value_error(url, obj, f"{depth} dimensions")
    # a str nested as deep parses, then fails the input check
    body = b'{"instances":[{"x":' + b"[" * depth + b'"s"' + b"]" * depth + b"}]}"
    expect_error(post(url, "/model/codec:echo_value", body), 400, "bytes or string type input  shape can only be (1,) or empty")
    assert echoed(url, 1) == 1  # the server keeps serving


def test_nesting_as_deep_as_a_tensor_can_have_round_trips(url):
    from mserve.protocol.codec import MAX_DIMS

    value = 1.0
    for _ in range(MAX_DIMS):
        value = [value]
    assert echoed(url, value) == value


# --------------------------------------------------------------------------- 3. response encoding


def raw_y(url: str, value) -> str:
    """The reply text of echo(value), reduced to the value of ``y``."""
    text = echo(url, value).text
    prefix, suffix = '{"instances":[{"y":', "}]}"
    assert text.startswith(prefix) and text.endswith(suffix), text
    return text[len(prefix) : -len(suffix)]


def test_float32_prints_shortest_round_trip(url):
    assert raw_y(url, 3.2) == "3.2"
    assert raw_y(url, [0.1, 3.2]) == "[0.1,3.2]"
    assert raw_y(url, tensor(np.array([0.1, 3.2, 1e-8], np.float32))) == "[0.1,3.2,1e-8]"
    assert echoed(url, 3.2) == 3.2


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_floats_always_print_as_floats(url, dtype):
    assert raw_y(url, tensor(np.array([1, 2], dtype))) == "[1.0,2.0]"
    assert raw_y(url, tensor(np.array(0, dtype), shape=[])) == "0.0"


def test_float16_prints_shortest_round_trip(url):
    # 65504 (float16 max) is 6.55e+04 at float16 precision: 65500.0 reads back as 65504
    assert raw_y(url, tensor(np.array([0.1, 3.2, 65504.0], np.float16))) == "[0.1,3.2,65500.0]"
    assert raw_y(url, tensor(np.array(0.1, np.float16), shape=[])) == "0.1"
    values = np.array([0.1, 3.2, 65504.0, -2.5e-5, 6e-8], np.float16)
    assert np.array_equal(np.array(echoed(url, tensor(values)), np.float16), values)


def test_float64_prints_full_precision(url):
    assert echoed(url, tensor(np.array([0.1, 1 / 3], np.float64))) == [0.1, 1 / 3]


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_integers_of_every_width(url, dtype):
    info = np.iinfo(dtype)
    array = np.array([info.min, 0, info.max], dtype)
    assert raw_y(url, tensor(array)) == f"[{info.min},0,{info.max}]"


def test_uint64_max(url):
    assert raw_y(url, tensor(np.array(2**64 - 1, np.uint64), shape=[])) == "18446744073709551615"


def test_bool_output(url):
    assert raw_y(url, tensor(np.array([True, False]))) == "[true,false]"
    assert raw_y(url, True) == "true"
    assert one(url, "make_value", kind="bool").json() == {"instances": [{"y": True}]}
    assert one(url, "make_value", kind="bools").json() == {"instances": [{"y": [[True, False]]}]}


def test_str_output(url):
    assert one(url, "make_value", kind="str").json() == {"instances": [{"y": "h\u00e9llo"}]}
    assert one(url, "make_value", kind="strarray").json() == {"instances": [{"y": "s0"}]}


def test_bytes_output_is_b64_object(url):
    r = one(url, "make_value", kind="bytes")
    assert r.json() == {"instances": [{"y": {"b64": b64(b"\x00\x01hi")}}]}


def test_python_scalars_output(url):
    assert one(url, "make_value", kind="pyfloat").text == '{"instances":[{"y":1.0}]}'
    assert one(url, "make_value", kind="pyint").text == '{"instances":[{"y":7}]}'
    assert one(url, "make_value", kind="f32").text == '{"instances":[{"y":3.2}]}'


def test_0d_array_is_a_scalar(url):
    assert raw_y(url, tensor(np.array(5, np.int64), shape=[])) == "5"
    assert raw_y(url, 2.5) == "2.5"


def test_empty_dims(url):
    assert raw_y(url, {"b64": "", "type": "int32", "shape": [0]}) == "[]"
    assert raw_y(url, {"b64": "", "type": "int32", "shape": [1, 0]}) == "[[]]"


@pytest.mark.parametrize("kind, text", [("object", "output type object"), ("bigint", "does not fit in 64 bits")])
def test_unencodable_output_is_a_500_with_message_not_a_trace(url, kind, text):
    expect_error(one(url, "make_value", kind=kind), 500, "output cannot be sent", text)
    # only that instance fails
    r = post(url, "/model/codec:make_value", {"instances": [{"kind": "pyint"}, {"kind": kind}]})
    assert r.status_code == 200
    got = r.json()["instances"]
    assert got[0] == {"y": 7} and text in got[1]["error_msg"]
    # the server keeps serving
    assert echoed(url, 1) == 1


# --------------------------------------------------------------------------- 3. partial / total failure


def test_stage_raising_for_one_instance_of_three(url):
    r = post(url, "/model/stages:pre_post", instances(1.0, -1.0, 2.0))
    assert r.status_code == 200
    body = r.json()
    assert body["instances"][0] == {"y": 21.0}
    assert body["instances"][2] == {"y": 41.0}
    assert list(body["instances"][1]) == ["error_msg"]
    assert "Preprocess Failed" in body["instances"][1]["error_msg"]
    assert "negative input" in body["instances"][1]["error_msg"]


def test_bad_value_in_one_instance_of_three_fails_the_whole_request(url):
    good = ADD_BODY["instances"][0]
    body = {"instances": [good, {"x1": [[1, 2], [3]], "x2": good["x2"]}, good]}
    msg = expect_error(post(url, "/model/add:add_common", body), 400)
    assert msg == (
        "Parser request failed, invalid json array: json size is 1, the dim 1 expected to be 2 (instance 1, input 'x1')"
    )


def test_missing_input_in_one_instance_fails_the_whole_request(url):
    good = ADD_BODY["instances"][0]
    body = {"instances": [good, {"x1": good["x1"]}]}
    msg = expect_error(post(url, "/model/add:add_common", body), 400)
    assert msg.startswith("Cannot find input x2 in instance input , servable add, method add_common")


def test_all_fail_same_cause_gives_one_error(url):
    r = post(url, "/model/stages:pre_post", instances(-1.0, -2.0, -3.0))
    expect_error(r, 400, "Preprocess Failed", "negative input")


def test_all_fail_same_missing_input_gives_one_error(url):
    body = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]]}] * 3}
    expect_error(post(url, "/model/add:add_common", body), 400, "Cannot find input x2 in instance input")


def test_all_fail_same_bad_value_gives_one_error(url):
    r = post(url, "/model/codec:echo_value", instances([], [], []))
    expect_error(r, 400, "json array, shape is empty")


def test_all_fail_same_model_mismatch_gives_one_error(url):
    int_instance = {"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}
    r = post(url, "/model/add:add_common", {"instances": [int_instance] * 2})
    expect_error(r, 400, "Given model input 0 data type")


def test_all_fail_different_causes_each_instance_reports(url):
    r = post(url, "/model/stages:pre_post", instances(-1.0, 13.0, "abc"))
    assert r.status_code == 400
    got = r.json()["instances"]
    assert len(got) == 3 and all(list(g) == ["error_msg"] for g in got)
    assert "Preprocess Failed: negative input" in got[0]["error_msg"]
    assert "Preprocess Failed: unlucky 13.0" in got[1]["error_msg"]
    assert "Preprocess Failed: could not convert string to float" in got[2]["error_msg"]


def test_postprocess_tag(url):
    r = post(url, "/model/stages:pre_post", instances(1.0, 200.0))
    assert r.status_code == 200
    got = r.json()["instances"]
    assert got[0] == {"y": 21.0}
    assert "Postprocess Failed: too large" in got[1]["error_msg"]


def test_python_stage_returning_wrong_number_of_outputs(url):
    expect_error(one(url, "wrong_output_count", x=1), 400, "Pair Failed", "is not equal to the outputs number 2 registered in method")


def test_batched_python_stage_returning_wrong_number_of_results(url):
    r = post(url, "/model/codec:wrong_result_count", instances(1, 2, 3))
    got = r.json()["instances"]  # as MindSpore: the instances with a result keep it
    assert got[:2] == [{"y": 1}, {"y": 2}]
    assert got[2] == {"error_msg": "Short Failed: The number 2 of instances returned by function 'short_batch' is "
                                   "not equal to the number 3 of instances provided to this function."}


def test_stage_exception_text_is_in_the_error(url):
    msg = expect_error(post(url, "/model/stages:pre_post", instances("abc")), 400, "Preprocess Failed")
    assert "could not convert string to float" in msg


def test_numpy_scalar_from_python_stage_feeds_a_model(url):
    r = post(url, "/model/stages:scalar_to_model", instances(1.0, 2.0))
    assert r.json() == {"instances": [{"y": 20.0}, {"y": 40.0}]}


# --------------------------------------------------------------------------- model input checks


def test_model_dtype_mismatch(url):
    r = post(url, "/model/add:add_common", {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}]})
    msg = expect_error(r, 400, "Given model input 0 data type", "not match the data type", "defined in model")
    assert "int32" in msg and "float32" in msg


def test_model_dtype_mismatch_second_input(url):
    r = post(url, "/model/add:add_common", {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1, 2], [3, 4]]}]})
    expect_error(r, 400, "Given model input 1 data type", "not match the data type", "defined in model")


def test_model_shape_mismatch(url):
    x = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    msg = expect_error(
        post(url, "/model/add:add_common", {"instances": [{"x1": x, "x2": x}]}),
        400,
        "Given model input 0 size",
        "not match the size",
        "defined in model",
    )
    assert "3, 2" in msg and "2, 2" in msg


def test_model_string_input(url):
    r = post(url, "/model/add:add_common", {"instances": [{"x1": "abc", "x2": [[1.0, 2.0], [3.0, 4.0]]}]})
    expect_error(r, 400, "Given model input 0", "defined in model")


def test_add_cast_casts_ints(url):
    r = post(url, "/model/add:add_cast", {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1, 2], [3, 4]]}]})
    assert r.json() == {"instances": [{"y": ADD_Y}]}


def test_batched_model_mismatch_fails_only_that_instance(url):
    r = post(url, "/model/models:symbolic", instances([1.0, 2.0, 3.0], [1.0, 2.0], [1, 2, 3], [0.0, 0.0, 0.5]))
    assert r.status_code == 200
    got = r.json()["instances"]
    assert got[0]["y"] == [2.0, 4.0, 6.0]
    assert "Given model input 0 size" in got[1]["error_msg"]
    assert "Given model input 0 data type" in got[2]["error_msg"]
    assert got[3]["y"] == [0.0, 0.0, 1.0]


# --------------------------------------------------------------------------- pipelines and batching


def test_pipeline_with_pre_and_postprocessing(url):
    r = post(url, "/model/stages:pre_post", instances(1.0, 0.5))
    assert r.json() == {"instances": [{"y": 21.0}, {"y": 11.0}]}


def test_python_stage_batch_size_none_is_per_instance(url):
    r = post(url, "/model/stages:batch_none", instances(1, 2, 3))
    assert r.json() == {"instances": [{"y": 2}, {"y": 3}, {"y": 4}]}


def test_python_stage_batch_size_0_gets_all_instances(url):
    r = post(url, "/model/stages:batch_all", instances(1, 2, 3, 4, 5))
    assert r.json() == {"instances": [{"y": v + 1, "n": 5} for v in range(1, 6)]}


def test_python_stage_batch_size_n_gets_chunks(url):
    r = post(url, "/model/stages:batch_two", instances(1, 2, 3, 4, 5))
    assert r.json() == {"instances": [{"y": v + 1, "n": n} for v, n in zip(range(1, 6), [2, 2, 2, 2, 1])]}


def test_python_batched_stage_raising_fails_its_chunk(url):
    r = post(url, "/model/stages:batch_two_raises", instances(1, -2, 3, 4))
    assert r.status_code == 200
    got = r.json()["instances"]
    assert "Batchstage Failed: negative in batch" in got[0]["error_msg"]
    assert "Batchstage Failed: negative in batch" in got[1]["error_msg"]
    assert got[2:] == [{"y": 3}, {"y": 4}]


def test_batched_model_takes_instances_in_one_call(url):
    """Symbolic batch: three instances go to the model in one call (``n`` is the
    batch the model saw: 3, or more if the server pads to a batch-size bucket)."""
    r = post(url, "/model/models:symbolic", instances([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.0, -1.0]))
    got = r.json()["instances"]
    assert [g["y"] for g in got] == [[2.0, 4.0, 6.0], [8.0, 10.0, 12.0], [1.0, 0.0, -2.0]]
    assert got[0]["n"] >= 3 and got[0]["n"] == got[1]["n"] == got[2]["n"]


def test_fixed_batch_artifact_pads_three_instances(url):
    rows = [[float(i), float(i) + 0.5, -float(i)] for i in range(3)]
    r = post(url, "/model/models:fixed_batch", instances(*rows))
    assert r.json() == {"instances": [{"y": [2 * v for v in row], "n": 4.0} for row in rows]}


def test_fixed_batch_artifact_splits_six_instances(url):
    rows = [[float(i), float(i) + 0.5, -float(i)] for i in range(6)]
    r = post(url, "/model/models:fixed_batch", instances(*rows))
    assert r.json() == {"instances": [{"y": [2 * v for v in row], "n": 4.0} for row in rows]}


def test_without_batch_dim_inputs(url):
    bias = [10.0, 20.0, 30.0]
    body = {"instances": [{"x": [1.0, 2.0, 3.0], "b": bias}, {"x": [0.0, 0.0, 1.0], "b": bias}]}
    r = post(url, "/model/models:add_bias", body)
    assert r.json() == {"instances": [{"y": [11.0, 22.0, 33.0]}, {"y": [10.0, 20.0, 31.0]}]}
    bad = {"instances": [{"x": [1.0, 2.0, 3.0], "b": [10.0, 20.0]}]}
    expect_error(post(url, "/model/models:add_bias", bad), 400, "Given model input 1 size")


def test_model_call_from_python_stage(url):
    r = post(url, "/model/stages:model_call_one", instances(1.0, 2.0))
    assert r.json() == {"instances": [{"y": 11.0}, {"y": 21.0}]}


def test_model_call_with_a_list_of_instances(url):
    r = post(url, "/model/stages:model_call_many", instances(1.0, 2.0, 3.0))
    assert r.json() == {"instances": [{"y": 11.0}, {"y": 21.0}, {"y": 31.0}]}


def test_model_call_with_bad_input_fails_the_stage(url):
    r = post(url, "/model/stages:model_call_one", instances(1.0, 2))
    assert r.status_code == 200
    got = r.json()["instances"]
    assert got[0] == {"y": 11.0}
    assert "Given model input 0 data type" in got[1]["error_msg"]


def test_without_batch_dim_inputs_differing_within_a_request(url):
    """Instances whose unbatched inputs differ are not batched together: each gets
    its own value."""
    body = {"instances": [{"x": [0.0, 0.0, 0.0], "b": [1.0, 1.0, 1.0]}, {"x": [0.0, 0.0, 0.0], "b": [2.0, 2.0, 2.0]}]}
    r = post(url, "/model/models:add_bias", body)
    assert r.json() == {"instances": [{"y": [1.0, 1.0, 1.0]}, {"y": [2.0, 2.0, 2.0]}]}


def test_without_batch_dim_inputs_never_leak_across_requests(url):
    from concurrent.futures import ThreadPoolExecutor

    def run(i: int) -> list[bool]:
        body = {"instances": [{"x": [0.0, 0.0, 0.0], "b": [float(i)] * 3}]}
        return [
            requests.post(url + "/model/models:add_bias", data=orjson.dumps(body)).json()
            == {"instances": [{"y": [float(i)] * 3}]}
            for _ in range(20)
        ]

    with ThreadPoolExecutor(4) as pool:
        results = [ok for oks in pool.map(run, range(4)) for ok in oks]
    assert all(results), f"{results.count(False)} of {len(results)} requests got another request's input"


# --------------------------------------------------------------------------- 503 / 504


@pytest.fixture(scope="module")
def tuned(url):
    """Two more RESTful servers on the same servables: a short request timeout, and
    room for one request at a time (torn down with the module's server)."""
    short = server.start_restful_server("127.0.0.1:0", request_timeout=0.3, additional=True).url
    single = server.start_restful_server("127.0.0.1:0", max_enqueued_requests=1, additional=True).url
    return short, single


def test_request_past_timeout_gives_time_out(tuned):
    short, _ = tuned
    expect_error(post(short, "/model/stages:slow", instances(0.6)), 504, "Time out")
    assert post(short, "/model/stages:slow", instances(0.0)).json() == {"instances": [{"y": 1.0}]}


def _while_busy(url: str, seconds: float) -> requests.Response:
    """A request sent while a ``seconds``-long one holds the server's only place
    (None if the long one could not get in first)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, "/model/stages:slow", instances(seconds))
        time.sleep(0.2)
        r = None
        while not slow.done():
            r = post(url, "/model/stages:slow", instances(0.0))
            if r.status_code != 200:
                break
            time.sleep(0.02)
        if slow.result().status_code != 200:
            return None
        assert slow.result().json() == {"instances": [{"y": seconds + 1}]}
        return r


def test_queue_full_gives_503_with_retry_after(tuned):
    _, single = tuned
    for _ in range(3):
        r = _while_busy(single, 1.0)
        if r is not None:  # (a Response is falsy when its status is an error)
            break
    expect_error(r, 503)
    assert r.headers.get("Retry-After")
    assert post(single, "/model/stages:slow", instances(0.0)).status_code == 200


# --------------------------------------------------------------------------- body size (413)


def _exchange(url: str, head: bytes, chunks=(), timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send a raw HTTP request (head, then body chunks) and read the reply; the server
    may answer and close before the body is fully sent."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    data = b""
    try:
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
            if b"\r\n\r\n" in data:
                header, _, rest = data.partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in header.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
    finally:
        sock.close()
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def _head(url: str, extra: str) -> bytes:
    host = urlsplit(url).netloc
    return f"POST /model/add:add_common HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def _expect_413(status, headers, body):
    assert status == 413, (status, body)
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body) == {"error_msg": f"http message is bigger than {LIMIT}"}


def _padded_add_body(size: int) -> bytes:
    body = orjson.dumps(ADD_BODY)
    return body + b" " * (size - len(body))


def test_body_over_limit_with_content_length(url):
    # Only the head and a little of the body is sent: the server decides from
    # Content-Length, without waiting for (or buffering) the body.
    head = _head(url, f"Content-Length: {LIMIT + 1}\r\nContent-Type: application/json\r\n")
    _expect_413(*_exchange(url, head, [b"{" * 1000]))
    assert post(url, "/model/add:add_common", ADD_BODY).status_code == 200


def test_body_over_limit_with_requests_client(url):
    big = _padded_add_body(LIMIT + 10)
    try:
        r = requests.post(url + "/model/add:add_common", data=big)
    except requests.ConnectionError:
        pytest.skip("the client saw the connection close before reading the reply")
    check_reply(r)
    expect_error(r, 413, f"http message is bigger than {LIMIT}")
    assert post(url, "/model/add:add_common", ADD_BODY).status_code == 200


def test_body_at_limit_is_accepted(url):
    r = post(url, "/model/add:add_common", _padded_add_body(LIMIT))
    assert r.status_code == 200, r.text
    assert r.json() == {"instances": [{"y": ADD_Y}]}


def _chunked(payload: bytes, size: int = 1 << 16):
    for start in range(0, len(payload), size):
        piece = payload[start : start + size]
        yield b"%x\r\n" % len(piece) + piece + b"\r\n"
    yield b"0\r\n\r\n"


def test_body_over_limit_chunked(url):
    head = _head(url, "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n")
    _expect_413(*_exchange(url, head, _chunked(_padded_add_body(LIMIT + 1))))
    assert post(url, "/model/add:add_common", ADD_BODY).status_code == 200
    # and far over: the server stops reading and answers
    _expect_413(*_exchange(url, head, _chunked(_padded_add_body(4 * LIMIT))))
    assert post(url, "/model/add:add_common", ADD_BODY).status_code == 200


def test_body_under_limit_chunked(url):
    head = _head(url, "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n")
    status, headers, body = _exchange(url, head, _chunked(_padded_add_body(LIMIT // 2)))
    assert status == 200 and orjson.loads(body) == {"instances": [{"y": ADD_Y}]}


def test_body_at_limit_chunked_is_accepted(url):
    head = _head(url, "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n")
    status, headers, body = _exchange(url, head, _chunked(_padded_add_body(LIMIT)))
    assert status == 200, body


def test_malformed_http_gets_a_json_error(url):
    head = _head(url, "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n")
    status, headers, body = _exchange(url, head, [b"zz\r\n{}\r\n0\r\n\r\n"])
    assert status == 400 and headers["content-type"] == "application/json"
    assert list(orjson.loads(body)) == ["error_msg"]
    assert post(url, "/model/add:add_common", ADD_BODY).status_code == 200


@pytest.mark.parametrize("value", [1e39, [1.0, -1e300], [[3.5e38]]])
def test_float_beyond_float32_is_refused_not_inf(value):
    from mserve.protocol.codec import ValueError_, decode_value

    with pytest.raises(ValueError_, match="out of float32 range"):
        decode_value(value)
    assert decode_value([3.4e38]).dtype == np.float32


def test_float32_max_as_printed_still_decodes():
    """float32's largest value prints as 3.4028235e+38, a little above it as a
    float64; it rounds to the largest float32, not to infinity, so it is accepted."""
    from mserve.protocol.codec import ValueError_, decode_value

    largest = float(np.finfo(np.float32).max)
    assert decode_value([3.4028235e38, -3.4028235e38]).tolist() == [largest, -largest]
    with pytest.raises(ValueError_, match=r"json float 3\.40282356\d*e\+38 is out of float32 range"):
        decode_value(2.0**128 - 2.0**103)  # halfway to the next power of two: rounds to inf


def test_unknown_servable_while_loading_is_503_not_404():
    import json

    from mserve.serving.dataplane import PredictHandler
    from mserve.serving.servable import ServableRegistry

    body = json.dumps(ADD_BODY).encode()
    loading = PredictHandler(ServableRegistry(), loading=lambda: True)
    status, reply, headers = loading.handle("/model/add:add_common", body)
    assert (status, headers.get("Retry-After")) == (503, "1")
    assert "still loading" in json.loads(reply)["error_msg"]
    loaded = PredictHandler(ServableRegistry())
    status, reply, _ = loaded.handle("/model/add:add_common", body)
    assert status == 404 and "servable is not available" in json.loads(reply)["error_msg"]
