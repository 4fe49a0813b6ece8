"""A compiled JAX program on one device, shared by the JAX model formats.

Compiles once per concrete input shape (``jit(...).lower(...).compile()``), keeps the
executables, and counts compilations so the server can show that nothing compiles on
the request path after warm-up.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import TensorSpec

log = logging.getLogger("mserve.jax")


def specs_from_avals(avals: Sequence[Any]) -> list[TensorSpec]:
    """TensorSpecs from JAX abstract values; symbolic dimensions become ``None``."""
    specs = []
    for aval in avals:
        shape = tuple(d if isinstance(d, int) else None for d in aval.shape)
        specs.append(TensorSpec(np.dtype(aval.dtype), shape))
    return specs


class JaxProgram:
    """``fn(*leading, *inputs)`` compiled per input shape for one device.

    ``leading`` holds arguments that stay on the device between calls (weights), so
    they are passed as buffers, not baked into the program as constants.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        device: jax.Device,
        leading: Sequence[Any] = (),
    ):
        self.inputs = inputs
        self.outputs = outputs
        self.device = device
        self._jitted = jax.jit(fn)
        self._sharding = jax.sharding.SingleDeviceSharding(device)
        self._leading = tuple(jax.device_put(leading, device)) if leading else ()
        self._leading_specs = tuple(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._sharding), arg)
            for arg in self._leading
        )
        self._executables: dict[tuple[tuple[int, ...], ...], Any] = {}
        self._lock = threading.Lock()
        self._compile_count = 0
        self._warm = False
        self.calls = 0  # device calls, for spotting how work spreads over devices

    @property
    def compile_count(self) -> int:
        return self._compile_count

    def _executable(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        exe = self._executables.get(shapes)
        if exe is not None:
            return exe
        with self._lock:
            exe = self._executables.get(shapes)
            if exe is None:
                specs = [
                    jax.ShapeDtypeStruct(shape, spec.dtype, sharding=self._sharding)
                    for shape, spec in zip(shapes, self.inputs)
                ]
                if self._warm:
                    log.warning("compiling on the request path for input shapes %s (not warmed up)", shapes)
                exe = self._jitted.lower(*self._leading_specs, *specs).compile()
                self._executables[shapes] = exe
                self._compile_count += 1
        return exe

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        for one in shapes:
            key = tuple(tuple(s) for s in one)
            exe = self._executable(key)
            zeros = [np.zeros(s, spec.dtype) for s, spec in zip(key, self.inputs)]
            # Run once too: the first execution allocates buffers and is slower.
            jax.block_until_ready(exe(*self._leading, *zeros))
        self._warm = True

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        exe = self._executable(tuple(a.shape for a in arrays))
        self.calls += 1
        out = exe(*self._leading, *arrays)
        return [np.asarray(leaf) for leaf in jax.tree.leaves(out)]


def resolve_device(device: Any) -> jax.Device:
    return device if isinstance(device, jax.Device) else jax.devices()[0]
