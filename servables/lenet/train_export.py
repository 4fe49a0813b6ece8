"""Train the LeNet-style digit classifier and export it with jax.export.

    .venv/bin/python servables/lenet/train_export.py            # train, report, export, write samples
    .venv/bin/python servables/lenet/train_export.py --samples-only   # only sample_data/digits/

Data: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``; it
ships with the package, nothing is downloaded). 1797 images, pixel values 0..16.
A fixed permutation (``numpy.random.RandomState(0)``) holds out 20% (360 images) as
the test split; the model never sees them during training.

Pixels go through the same quantization a PNG has, so a served PNG reproduces the
training input bit for bit::

    uint8 = round(value * 255 / 16)       # what sample_data/digits/*.png hold
    model input = float32(uint8) / 255    # what the servable's Preprocess stage does

Writes (all relative to the repository root):

* ``servables/lenet/1/lenet.jaxexport``: ``f(images: float32[b, 8, 8, 1]) -> logits:
  float32[b, 10]`` with a symbolic batch ``b``, parameters baked in as constants,
  exported for CPU and CUDA.
* ``servables/lenet/1/TRAINING.md``: accuracy and how it was produced.
* ``sample_data/digits/digit_{0..9}.png`` (one held-out test image per class) and
  ``sample_data/digits/predict_request.json``.

Needs the ``train`` extra (scikit-learn): ``pip install -e '.[train]'``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ARTIFACT = HERE / "1" / "lenet.jaxexport"
METRICS = HERE / "1" / "TRAINING.md"
SAMPLES = REPO / "sample_data" / "digits"

SEED = 0
TEST_FRACTION = 0.2
EPOCHS = 40
BATCH = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4


# ----------------------------------------------------------------------------- data


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Dataset pixels (0..16) -> 8-bit grayscale (0..255), as stored in the PNGs."""
    return np.round(np.asarray(values, np.float64) * (255.0 / 16.0)).astype(np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """8-bit grayscale (..., 8, 8) -> the model's float32 input (..., 8, 8, 1) in [0, 1].
    The servable's Preprocess stage does exactly this."""
    return (np.asarray(pixels, np.float32) / np.float32(255.0))[..., None]


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_pixels, train_labels, test_pixels, test_labels); pixels uint8 [n, 8, 8].

    The split is fixed (RandomState(0) permutation, last 20% held out), so the tests
    can rebuild the same held-out set to check the committed artifact."""
    from sklearn.datasets import load_digits  # the `train` extra

    digits = load_digits()
    pixels = to_uint8(digits.images)  # (1797, 8, 8)
    labels = digits.target.astype(np.int32)
    order = np.random.RandomState(SEED).permutation(len(labels))
    n_test = int(round(len(labels) * TEST_FRACTION))
    train, test = order[:-n_test], order[-n_test:]
    return pixels[train], labels[train], pixels[test], labels[test]


# ---------------------------------------------------------------------------- model
#
# conv 3x3x16 (SAME) -> relu -> conv 3x3x32 (SAME) -> relu -> maxpool 2x2
# -> flatten (4*4*32 = 512) -> dense 64 -> relu -> dense 10 (logits).  NHWC.

_DN = ("NHWC", "HWIO", "NHWC")


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    def he(key, shape, fan_in):
        return jax.random.normal(key, shape, jnp.float32) * jnp.sqrt(2.0 / fan_in)

    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "conv1_w": he(k1, (3, 3, 1, 16), 9 * 1),
        "conv1_b": jnp.zeros((16,), jnp.float32),
        "conv2_w": he(k2, (3, 3, 16, 32), 9 * 16),
        "conv2_b": jnp.zeros((32,), jnp.float32),
        "fc1_w": he(k3, (512, 64), 512),
        "fc1_b": jnp.zeros((64,), jnp.float32),
        "fc2_w": he(k4, (64, 10), 64) * 0.5,
        "fc2_b": jnp.zeros((10,), jnp.float32),
    }


def forward(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """x: float32[b, 8, 8, 1] in [0, 1] -> logits float32[b, 10]."""
    x = jax.lax.conv_general_dilated(x, params["conv1_w"], (1, 1), "SAME", dimension_numbers=_DN)
    x = jax.nn.relu(x + params["conv1_b"])
    x = jax.lax.conv_general_dilated(x, params["conv2_w"], (1, 1), "SAME", dimension_numbers=_DN)
    x = jax.nn.relu(x + params["conv2_b"])
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # [b, 4, 4, 32]
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["fc1_w"] + params["fc1_b"])
    return x @ params["fc2_w"] + params["fc2_b"]


def param_count(params: dict[str, jax.Array]) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------- training


def _loss(params, x, y):
    logits = forward(params, x)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return nll


@jax.jit
def _adam_step(params, m, v, step, x, y):
    """One AdamW step (plain JAX, no optimizer library)."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    step = step + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    mhat_scale = 1.0 / (1 - b1**step)
    vhat_scale = 1.0 / (1 - b2**step)
    params = jax.tree_util.tree_map(
        lambda p, m, v: p
        - LEARNING_RATE * (m * mhat_scale / (jnp.sqrt(v * vhat_scale) + eps) + WEIGHT_DECAY * p),
        params,
        m,
        v,
    )
    return params, m, v, step, loss


@jax.jit
def _predict(params, x):
    return jnp.argmax(forward(params, x), axis=-1)


def train(train_x: np.ndarray, train_y: np.ndarray) -> dict[str, jax.Array]:
    params = init_params(jax.random.PRNGKey(SEED))
    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    step = jnp.zeros((), jnp.float32)
    rng = np.random.RandomState(SEED)
    n = len(train_y)
    steps_per_epoch = n // BATCH  # drop the ragged tail: one compiled shape
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * BATCH : (i + 1) * BATCH]
            params, m, v, step, loss = _adam_step(params, m, v, step, train_x[idx], train_y[idx])
            losses.append(loss)
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}  loss {float(np.mean(jnp.stack(losses))):.4f}")
    return params


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(predict(x)) == y))


# --------------------------------------------------------------------------- export


def export_model(params: dict[str, jax.Array]) -> export.Exported:
    closed = jax.jit(lambda x: forward(params, x))
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, 8, 8, 1"), jnp.float32)
    return export.export(closed, platforms=("cpu", "cuda"))(spec)


def write_samples(test_pixels: np.ndarray, test_labels: np.ndarray) -> None:
    """One held-out test image per digit as an 8x8 grayscale PNG, plus a request body."""
    from PIL import Image

    SAMPLES.mkdir(parents=True, exist_ok=True)
    for digit in range(10):
        first = int(np.flatnonzero(test_labels == digit)[0])
        Image.fromarray(test_pixels[first]).save(SAMPLES / f"digit_{digit}.png", optimize=True)
    body = {
        "instances": [
            {"image": {"b64": base64.b64encode((SAMPLES / f"digit_{d}.png").read_bytes()).decode(), "type": "bytes"}}
            for d in (3, 7)
        ]
    }
    (SAMPLES / "predict_request.json").write_text(json.dumps(body, indent=2) + "\n")
    print(f"wrote {SAMPLES}/digit_0..9.png and predict_request.json (digits 3 and 7)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples-only", action="store_true", help="only (re)write sample_data/digits/")
    args = parser.parse_args(argv)

    train_px, train_y, test_px, test_y = load_split()
    write_samples(test_px, test_y)
    if args.samples_only:
        return 0
    train_x, test_x = normalize(train_px), normalize(test_px)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; train {len(train_y)}, test {len(test_y)} images")

    start = time.perf_counter()
    params = train(train_x, train_y)
    seconds = time.perf_counter() - start
    n_params = param_count(params)
    train_acc = accuracy(lambda x: _predict(params, x), train_x, train_y)
    test_acc = accuracy(lambda x: _predict(params, x), test_x, test_y)

    exported = export_model(params)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_bytes(exported.serialize())
    # Check what was written, not what is in memory: deserialize and rerun.
    reloaded = export.deserialize(bytearray(ARTIFACT.read_bytes()))
    export_acc = accuracy(lambda x: jnp.argmax(reloaded.call(x), axis=-1), test_x, test_y)

    print(f"parameters: {n_params}; training took {seconds:.1f} s")
    print(f"train accuracy: {train_acc:.4f}")
    print(f"test accuracy: {test_acc:.4f} ({int(round(test_acc * len(test_y)))}/{len(test_y)} held-out images)")
    print(f"exported artifact test accuracy: {export_acc:.4f}")
    print(f"wrote {ARTIFACT} ({ARTIFACT.stat().st_size} bytes): {exported.in_avals} -> {exported.out_avals}")

    METRICS.write_text(
        "# lenet version 1: training record\n\n"
        "Written by `servables/lenet/train_export.py`; rerun with\n"
        "`.venv/bin/python servables/lenet/train_export.py` from the repository root.\n\n"
        "| what | value |\n|---|---|\n"
        "| data | scikit-learn `load_digits` (8x8, 1797 images), fixed split "
        f"`RandomState({SEED})`, {len(train_y)} train / {len(test_y)} held-out test |\n"
        "| model | conv3x3x16-relu, conv3x3x32-relu, maxpool2, dense64-relu, dense10 (NHWC) |\n"
        f"| parameters | {n_params} |\n"
        f"| training | AdamW lr {LEARNING_RATE}, wd {WEIGHT_DECAY}, batch {BATCH}, {EPOCHS} epochs, seed {SEED} |\n"
        f"| train accuracy | {train_acc:.4f} |\n"
        f"| **test accuracy** | **{test_acc:.4f}** ({int(round(test_acc * len(test_y)))}/{len(test_y)}) |\n"
        f"| exported artifact, test accuracy | {export_acc:.4f} |\n"
        f"| artifact | `lenet.jaxexport`, {ARTIFACT.stat().st_size} bytes, "
        f"`float32[b,8,8,1] -> float32[b,10]` logits, platforms cpu+cuda |\n"
        f"| jax | {jax.__version__} |\n"
    )
    print(f"wrote {METRICS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
