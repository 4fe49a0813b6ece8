"""A compiled JAX program on one device, shared by the JAX model formats.

Compiles once per concrete input shape (``jit(...).lower(...).compile()``), keeps the
executables, and counts compilations so the server can show that nothing compiles on
the request path after warm-up.

On the CPU, JAX dispatches asynchronously by default: a call returns at once and the
work runs on another thread, which the caller then waits for. A server always waits
for the result right away, so the hand-off buys nothing and costs a thread wake-up
each way: LeNet's predict measured 300 -> 233 µs per request in-process with it off.
`prefer_sync_cpu_dispatch` turns it off (``jax_cpu_enable_async_dispatch``, a
process-wide JAX setting read when JAX creates its CPU client, so the server calls it
before loading anything; ``MSERVE_JAX_CPU_ASYNC=1`` keeps JAX's default).
"""

from __future__ import annotations

import logging
import os
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


def prefer_sync_cpu_dispatch() -> None:
    """Run CPU computations on the calling thread (see the module docstring). No
    effect once JAX has made its CPU client in this process."""
    if os.environ.get("MSERVE_JAX_CPU_ASYNC", "0") != "1":
        jax.config.update("jax_cpu_enable_async_dispatch", False)


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
