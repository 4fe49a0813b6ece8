"""LeNet-style digit classifier: PNG in, digit out (MindSpore Serving's LeNet example).

Method ``predict(image)``:

* ``image``: PNG (or any format Pillow reads) bytes of a digit, white (high) ink on
  a black (low) background like scikit-learn's ``load_digits``; sent as
  ``{"image": {"b64": "...", "type": "bytes"}}``. Any size and mode: it is made
  8-bit grayscale and, unless already 8x8, resized to 8x8.
* outputs: ``result`` (int32, the predicted digit 0..9) and ``probability``
  (float32, the softmax probability of that digit).

Stages: Preprocess (Python, per instance: decode and normalize) -> the model
(``lenet.jaxexport``, ``float32[b, 8, 8, 1] -> float32[b, 10]`` logits, instances
stacked into the batch) -> Postprocess (Python, per instance: argmax and softmax).
A picture that cannot be decoded fails only its own instance, with
``Preprocess Failed: ...``.

The model and its normalization come from ``train_export.py`` beside this file.
"""

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from mserve import register

# Refuse absurd images before decoding their pixels (a digit is 8x8; a photo of one
# may be larger, but nothing legitimate here needs more than this).
MAX_PIXELS = 4096 * 4096
SIZE = 8


class _Rejected(ValueError):
    """A decodable picture that this servable refuses."""


def decode_digit(image):
    """PNG bytes (1-D uint8 array) -> float32[8, 8, 1] in [0, 1], exactly the
    training normalization: 8-bit grayscale / 255."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 1:
        got = f"{image.dtype.name} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be bytes (send {{'b64': ..., 'type': 'bytes'}}), got {got}")
    try:
        with Image.open(io.BytesIO(image.tobytes())) as picture:
            width, height = picture.size
            if width * height > MAX_PIXELS:
                raise _Rejected(f"image is {width}x{height}, more than {MAX_PIXELS} pixels")
            if picture.mode.startswith("I"):
                # 16-bit grayscale (PNG opens as "I;16" or "I"): scale 0..65535 to
                # 0..255, where convert("L") would clip.
                wide = np.clip(np.asarray(picture, dtype=np.float64), 0, 65535)
                picture = Image.fromarray(np.round(wide / 257.0).astype(np.uint8))
            gray = picture.convert("L")
            if gray.size != (SIZE, SIZE):
                gray = gray.resize((SIZE, SIZE), Image.Resampling.BOX)
            pixels = np.asarray(gray, dtype=np.uint8)
    except _Rejected:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"cannot decode image ({len(image)} bytes): not a PNG or other format Pillow reads") from None
    except Exception as exc:  # PIL raises assorted types on corrupt input
        raise ValueError(f"cannot decode image ({len(image)} bytes): {exc}") from None
    return (pixels.astype(np.float32) / np.float32(255.0))[:, :, None]


def top_class(logits):
    """float32[10] logits -> (int32 digit, float32 softmax probability of it)."""
    logits = np.asarray(logits, dtype=np.float64)
    digit = int(np.argmax(logits))
    shifted = np.exp(logits - logits[digit])
    return np.int32(digit), np.float32(1.0 / shifted.sum())


model = register.declare_model(model_file="lenet.jaxexport", model_format="jax_export", with_batch_dim=True)


@register.register_method(output_names=["result", "probability"])
def predict(image):
    x = register.add_stage(decode_digit, image, outputs_count=1, tag="Preprocess")
    logits = register.add_stage(model, x, outputs_count=1)
    result, probability = register.add_stage(top_class, logits, outputs_count=2, tag="Postprocess")
    return result, probability
