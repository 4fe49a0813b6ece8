"""The bundled lenet servable: a real CNN trained on scikit-learn's 8x8 digits,
served from PNG bytes through Preprocess -> batched model -> Postprocess."""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import numpy as np
import pytest
import requests
from jax import export
from PIL import Image

from support import BUNDLED, REPO, serving

from mserve import server

DIGITS = REPO / "sample_data" / "digits"
ARTIFACT = BUNDLED / "lenet" / "1" / "lenet.jaxexport"
URL = "/model/lenet:predict"


def _train_export():
    """servables/lenet/train_export.py as a module (its split and normalization)."""
    spec = importlib.util.spec_from_file_location("lenet_train_export", BUNDLED / "lenet" / "train_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii"), "type": "bytes"}


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    picture = Image.fromarray(pixels)
    if mode:
        picture = picture.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(digit: int) -> bytes:
    return (DIGITS / f"digit_{digit}.png").read_bytes()


@pytest.fixture(scope="module")
def lenet_url():
    with serving(server.ServableStartConfig(BUNDLED, "lenet")) as url:
        yield url


def _predict(url: str, images: list[bytes]) -> requests.Response:
    return requests.post(url + URL, json={"instances": [{"image": _b64(b)} for b in images]}, timeout=60)


def test_each_sample_digit_is_recognized(lenet_url):
    for digit in range(10):
        r = _predict(lenet_url, [_sample(digit)])
        assert r.status_code == 200, r.text
        (out,) = r.json()["instances"]
        assert set(out) == {"result", "probability"}
        assert out["result"] == digit, (digit, out)
        assert isinstance(out["probability"], float) and 0.5 < out["probability"] <= 1.0, out


def test_many_instances_in_one_request_keep_their_order(lenet_url):
    order = [7, 0, 3, 3, 9, 1, 8, 2, 6, 5, 4, 7]
    r = _predict(lenet_url, [_sample(d) for d in order])
    assert r.status_code == 200, r.text
    assert [o["result"] for o in r.json()["instances"]] == order


def test_committed_request_body(lenet_url):
    body = json.loads((DIGITS / "predict_request.json").read_text())
    r = requests.post(lenet_url + URL, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert [o["result"] for o in r.json()["instances"]] == [3, 7]


def test_corrupt_image_fails_only_itself(lenet_url):
    good3, good7 = _sample(3), _sample(7)
    truncated = good3[: len(good3) // 2]
    r = _predict(lenet_url, [good3, b"this is not a png", truncated, good7])
    assert r.status_code == 200, r.text
    out = r.json()["instances"]
    assert out[0]["result"] == 3 and out[3]["result"] == 7
    for bad in (out[1], out[2]):
        assert set(bad) == {"error_msg"}, bad
        assert "Preprocess Failed" in bad["error_msg"], bad
        assert "0x" not in bad["error_msg"], bad  # no object reprs leak out


def test_non_bytes_image_fails_in_preprocess(lenet_url):
    r = requests.post(lenet_url + URL, json={"instances": [{"image": 1.5}, {"image": _b64(_sample(1))}]}, timeout=60)
    out = r.json()["instances"]
    assert "Preprocess Failed" in out[0]["error_msg"]
    assert out[1]["result"] == 1


def test_other_sizes_and_modes_are_normalized(lenet_url):
    pixels = np.asarray(Image.open(DIGITS / "digit_4.png"))
    big = np.kron(pixels, np.ones((4, 4), np.uint8))  # 32x32, box-resizes back exactly
    sixteen_bit = pixels.astype(np.uint16) * 257
    r = _predict(lenet_url, [_png(big), _png(pixels, "RGB"), _png(pixels, "LA"), _png(sixteen_bit)])
    assert r.status_code == 200, r.text
    assert [o["result"] for o in r.json()["instances"]] == [4, 4, 4, 4]


def test_artifact_is_small_symbolic_and_portable():
    exported = export.deserialize(bytearray(ARTIFACT.read_bytes()))
    assert ARTIFACT.stat().st_size < 1_000_000
    assert set(exported.platforms) >= {"cpu", "cuda"}
    (aval,) = exported.in_avals
    assert str(aval.dtype) == "float32" and aval.shape[1:] == (8, 8, 1)
    assert not isinstance(aval.shape[0], int)  # symbolic batch: any size batches
    (out,) = exported.out_avals
    assert out.shape[1:] == (10,)


def test_committed_artifact_accuracy_on_held_out_split():
    pytest.importorskip("sklearn")
    te = _train_export()
    _, _, test_px, test_y = te.load_split()
    exported = export.deserialize(bytearray(ARTIFACT.read_bytes()))
    predicted = np.argmax(np.asarray(exported.call(te.normalize(test_px))), axis=-1)
    accuracy = float(np.mean(predicted == test_y))
    assert len(test_y) > 300
    assert accuracy > 0.95, accuracy


def test_served_predictions_match_the_artifact_on_every_held_out_image(lenet_url):
    """PNG -> Preprocess must reproduce the training input exactly, so the server
    agrees with the artifact on all held-out images (one 359-instance request)."""
    pytest.importorskip("sklearn")
    te = _train_export()
    _, _, test_px, test_y = te.load_split()
    exported = export.deserialize(bytearray(ARTIFACT.read_bytes()))
    direct = np.argmax(np.asarray(exported.call(te.normalize(test_px))), axis=-1)
    r = _predict(lenet_url, [_png(p) for p in test_px])
    assert r.status_code == 200, r.text
    served = np.array([o["result"] for o in r.json()["instances"]])
    assert np.array_equal(served, direct)
    assert float(np.mean(served == test_y)) > 0.95


def test_sample_pngs_are_held_out_test_images():
    pytest.importorskip("sklearn")
    _, _, test_px, test_y = _train_export().load_split()
    for digit in range(10):
        pixels = np.asarray(Image.open(DIGITS / f"digit_{digit}.png"))
        assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
        matches = [i for i in np.flatnonzero(test_y == digit) if np.array_equal(test_px[i], pixels)]
        assert matches, f"digit_{digit}.png is not a held-out test image"
