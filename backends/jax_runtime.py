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

from . import Device, TensorSpec

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
    """``fn(*leading, *inputs)`` compiled per input shape for one device, or for a
    mesh of devices when ``leading_shardings``/``input_shardings`` are given.

    ``leading`` holds arguments that stay on the device(s) between calls (weights),
    so they are passed as buffers, not baked into the program as constants; with a
    sharding each device holds only its slice.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        device: jax.Device,
        leading: Sequence[Any] = (),
        devices: Sequence[jax.Device] | None = None,
        leading_shardings: Sequence[Any] | None = None,
        input_shardings: Sequence[Any] | None = None,
    ):
        self.inputs = inputs
        self.outputs = outputs
        self.device = device
        single = jax.sharding.SingleDeviceSharding(device)
        # The devices it runs on (all of a mesh), as mserve names them: cpu:0, gpu:1.
        self.devices = [Device(platform_type(d), d.id) for d in (devices or [device])]
        self.sharded = input_shardings is not None or leading_shardings is not None
        self._jitted = jax.jit(fn)
        self._input_shardings = list(input_shardings) if input_shardings is not None else [single] * len(inputs)
        if leading_shardings is None:
            leading_shardings = [jax.tree.map(lambda _: single, arg) for arg in leading]
        self._leading = tuple(jax.device_put(arg, sh) for arg, sh in zip(leading, leading_shardings))
        self._leading_specs = tuple(
            jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), arg)
            for arg in self._leading
        )
        self._executables: dict[tuple[tuple[int, ...], ...], Any] = {}
        self._lock = threading.Lock()
        self._compile_count = 0
        self._warm = False
        self.calls = 0  # device calls, for spotting how work spreads over devices

    @property
    def leading(self) -> tuple[Any, ...]:
        """The arguments kept on the device(s): the weights, as ``jax.Array``s."""
        return self._leading

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
                    jax.ShapeDtypeStruct(shape, spec.dtype, sharding=sharding)
                    for shape, spec, sharding in zip(shapes, self.inputs, self._input_shardings)
                ]
                if self.sharded:
                    self._check_splits(shapes)
                if self._warm:
                    log.warning("compiling on the request path for input shapes %s (not warmed up)", shapes)
                exe = self._jitted.lower(*self._leading_specs, *specs).compile()
                self._executables[shapes] = exe
                self._compile_count += 1
        return exe

    def _check_splits(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        """An input split over mesh axes needs dimensions those axes divide; say which
        batch sizes work instead of JAX's tiling message."""
        for i, (shape, sharding) in enumerate(zip(shapes, self._input_shardings)):
            spec = getattr(sharding, "spec", ())
            for dim, axes in enumerate(tuple(spec)[: len(shape)]):
                if axes is None:
                    continue
                names = (axes,) if isinstance(axes, str) else tuple(axes)
                parts = int(np.prod([sharding.mesh.shape[a] for a in names]))
                if shape[dim] % parts:
                    advice = (f"; give batch sizes that are multiples of {parts} "
                              f"(options={{'batch_sizes': [{parts}, {2 * parts}, ...]}})" if dim == 0 else "")
                    raise ValueError(f"input {i} is split {parts} ways over mesh axes {names} along dimension {dim}, "
                                     f"which a shape {shape} does not divide{advice}")

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        for one in shapes:
            key = tuple(tuple(s) for s in one)
            exe = self._executable(key)
            zeros = self._place([np.zeros(s, spec.dtype) for s, spec in zip(key, self.inputs)])
            # Run once too: the first execution allocates buffers and is slower.
            jax.block_until_ready(exe(*self._leading, *zeros))
        self._warm = True

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        # The compiled executable looked up here and the placement step skipped off a
        # mesh: for a small model every Python call on this path is a visible cost.
        shapes = tuple([a.shape for a in arrays])
        exe = self._executables.get(shapes)
        if exe is None:
            exe = self._executable(shapes)
        self.calls += 1
        out = exe(*self._leading, *(self._place(arrays) if self.sharded else arrays))
        # The usual outputs, one array or a flat tuple/list of them, skip the pytree
        # walk (about 1 µs, a few % of a small model's predict); the leaves are the same.
        if isinstance(out, jax.Array):
            return [np.asarray(out)]
        if type(out) in (tuple, list) and all(isinstance(leaf, jax.Array) for leaf in out):
            return [np.asarray(leaf) for leaf in out]
        return [np.asarray(leaf) for leaf in jax.tree.leaves(out)]

    def _place(self, arrays: Sequence[np.ndarray]) -> Sequence[Any]:
        """Host arrays as the program wants them: as they are on one device (the
        executable copies them), split or replicated over the mesh when sharded."""
        if not self.sharded:
            return arrays
        return jax.device_put(list(arrays), self._input_shardings)

    def close(self) -> None:
        """Free the device buffers and executables; the instance is unusable after."""
        with self._lock:
            for arr in jax.tree.leaves(self._leading):
                arr.delete()
            self._leading = ()
            self._executables.clear()


def platform_type(device: jax.Device) -> str:
    """mserve's device type for a JAX device: ``cuda``/``rocm`` are ``gpu``."""
    return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform


def jax_devices(devices: Sequence[Any]) -> list[jax.Device]:
    """The JAX devices for mserve `Device`s (type and id); a clear error when the
    type is not JAX's or the id does not exist. ``jax.Device``s pass through."""
    found = []
    for device in devices:
        if isinstance(device, jax.Device):
            found.append(device)
            continue
        kind = device.type or jax.default_backend()
        try:
            present = jax.devices(kind)
        except RuntimeError as exc:
            raise ValueError(f"device type {kind!r} is not available to JAX here: {exc}") from None
        if not 0 <= device.id < len(present):
            raise ValueError(
                f"device id {device.id} does not exist: {len(present)} {kind} device(s) present"
                + (" (on the CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)" if kind == "cpu" else "")
            )
        found.append(present[device.id])
    return found


def resolve_device(device: Any) -> jax.Device:
    """One JAX device from a `Device`, a ``jax.Device``, or a one-device group."""
    if isinstance(device, (tuple, list)) and device and not isinstance(device, Device):
        if len(device) != 1:
            raise ValueError(f"this model runs on one device, got {len(device)}; declare a sharding to span several")
        device = device[0]
    if device is None:
        return jax.devices()[0]
    return jax_devices([device])[0]
