"""`/docs` "Try it out": the example body of every method, sent exactly as the page
sends it, is answered without an error. Swagger UI puts the document's example into
the editor as JSON text, so the example is checked as JSON text: floats for float32
inputs must not read as integers (a browser writes 1.0 as 1, which is int32 on the
wire), and lenet's image is a real PNG digit, not the number 0."""

from __future__ import annotations

import json

import pytest
import requests

from mserve import server
from support import BUNDLED, serving


@pytest.fixture(scope="module")
def url():
    with serving([server.ServableStartConfig(BUNDLED, "add"), server.ServableStartConfig(BUNDLED, "lenet")]) as base:
        yield base


def _examples(url: str) -> dict[str, dict]:
    document = requests.get(f"{url}/openapi.json", timeout=30).json()
    return {
        path: operation["post"]["requestBody"]["content"]["application/json"]["example"]
        for path, operation in document["paths"].items()
        if path.startswith("/model/") and "{" not in path
    }


def _as_a_browser_writes(example: dict) -> str:
    # JSON.stringify: a float with no fraction loses its ".0".
    return json.dumps(example, default=str).replace(".0,", ",").replace(".0]", "]").replace(".0}", "}")


def test_every_method_has_an_example_that_works_as_sent(url):
    examples = _examples(url)
    assert set(examples) == {"/model/add:add_common", "/model/add:add_cast", "/model/lenet:predict"}
    for path, example in examples.items():
        reply = requests.post(url + path, data=_as_a_browser_writes(example), timeout=30)
        assert reply.status_code == 200, f"{path}: {reply.text}"
        assert "error_msg" not in reply.text, f"{path}: {reply.text}"


def test_float_inputs_get_floats_that_stay_floats(url):
    example = _examples(url)["/model/add:add_common"]
    leaves = [v for row in example["instances"][0]["x1"] for v in row]
    assert len(leaves) == 4 and all(isinstance(v, float) and not v.is_integer() for v in leaves)


def test_lenet_example_is_a_sample_digit(url):
    example = _examples(url)["/model/lenet:predict"]
    assert example["instances"][0]["image"]["type"] == "bytes"
    reply = requests.post(f"{url}/model/lenet:predict", json=example, timeout=30).json()
    assert reply["instances"][0]["result"] == 3
