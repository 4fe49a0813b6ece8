"""A minimal mserve backend plugin: ``model_format="npz_linear"``.

The model file is an ``.npz`` holding ``w`` (in x out) and ``b`` (out); the model is
``y = x @ w + b`` (``options={"activation": "relu"}`` adds a ReLU), run by numpy on
the CPU. It shows everything a backend declares and implements; a real one swaps
numpy for its framework, imported inside ``load`` so that finding backends stays
cheap for servers that never use it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mserve.backends import Backend, Device, LoadRequest, TensorSpec

ACTIVATIONS = {None: lambda y: y, "relu": lambda y: np.maximum(y, 0)}


class LinearRuntime:
    """One model instance on one device."""

    def __init__(self, w: np.ndarray, b: np.ndarray, activation: str | None, device: Device):
        # A free (None) leading dimension is the batch: mserve stacks instances into it.
        self.inputs = [TensorSpec(np.dtype(np.float32), (None, w.shape[0]))]
        self.outputs = [TensorSpec(np.dtype(np.float32), (None, w.shape[1]))]
        self.devices = [device]
        self._w, self._b, self._act = w, b, ACTIVATIONS[activation]
        self.calls = 0

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        (x,) = arrays  # already checked against self.inputs by mserve
        self.calls += 1
        return [self._act(x @ self._w + self._b).astype(np.float32)]

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        for (shape,) in shapes:  # one entry per batch size mserve will use
            self.predict([np.zeros(shape, np.float32)])

    def close(self) -> None:
        self._w = self._b = None  # a device backend frees device memory here


def load(request: LoadRequest) -> LinearRuntime:
    if request.config_file is not None or request.context:
        raise ValueError("npz_linear takes no config_file or context")  # never ignore a setting
    if len(request.files) != 1:
        raise ValueError(f"npz_linear expects one .npz file, got {len(request.files)}")
    activation = request.options.get("activation")
    if activation not in ACTIVATIONS:
        raise ValueError(f"options['activation'] must be one of {sorted(map(str, ACTIVATIONS))}, got {activation!r}")
    with np.load(request.files[0], allow_pickle=False) as data:
        w, b = data["w"].astype(np.float32), data["b"].astype(np.float32)
    if w.ndim != 2 or b.shape != (w.shape[1],):
        raise ValueError(f"{request.files[0]}: w must be (in, out) and b (out,), got {w.shape} and {b.shape}")
    return LinearRuntime(w, b, activation, request.device)


backend = Backend(
    name="npz_linear",
    formats=("npz_linear",),
    device_types=("cpu",),
    load=load,
    description="y = x @ w + b from an .npz file, in numpy",
)
