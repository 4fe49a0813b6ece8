"""Pre- and postprocessing of the lenet servable, beside its servable_config.py."""

from io import BytesIO

import numpy as np
from PIL import Image

SIZE = 8  # the bundled LeNet artifact reads 8x8 grayscale digits, white ink on black


def preprocess_eager(image):
    """Image bytes (a 1-D uint8 array) -> float32[8, 8, 1] in [0, 1]."""
    image = Image.open(BytesIO(image.tobytes())).convert("L")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX)
    image = np.array(image, np.float32)
    image = image / 255.0
    return image[:, :, None]


def postprocess_top1(score):
    """The index of the highest score: the digit."""
    max_idx = np.argmax(score)
    return max_idx
