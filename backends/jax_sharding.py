"""Sharded ``jax_function`` models: one instance spanning several devices.

A servable declares the layout in the model's options; the devices are its
``device_ids`` (all of them form one mesh, so ``device_ids=[0, 1, 2, 3]`` is ONE
instance, not four)::

    from jax.sharding import PartitionSpec as P

    model = register.declare_model(
        model_file="weights.npz", model_format="jax_function",
        options={
            "function": predict,
            "input_specs": [("b, 512", "float32")],
            "sharding": {
                "mesh": {"model": 4},                  # axis name -> size (product = devices)
                "params": {"w1": P(None, "model"),     # weight name -> PartitionSpec
                           "w2": P("model", None)},    # weights not named: replicated
                "inputs": [P()],                       # per input; default: replicated
            },
        },
    )

``"mesh": "model"`` (or ``("model",)``) is one axis over all the devices. JAX's
compiler (GSPMD) inserts the collectives, and outputs come back gathered on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _partition_spec(value: Any, where: str) -> PartitionSpec:
    if value is None:
        return PartitionSpec()
    if isinstance(value, PartitionSpec):
        return value
    if isinstance(value, (tuple, list)):
        return PartitionSpec(*value)
    raise ValueError(f"sharding {where}: {value!r} is not a PartitionSpec (or a tuple of mesh axis names)")


def _mesh_shape(spec: Any, count: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Axis names and sizes from ``{"data": 2, "model": 2}``, ``"model"`` or ``("model",)``."""
    if isinstance(spec, str):
        spec = (spec,)
    if isinstance(spec, Mapping):
        names = tuple(str(k) for k in spec)
        sizes = tuple(int(v) for v in spec.values())
    elif isinstance(spec, (tuple, list)) and len(spec) == 1 and isinstance(spec[0], str):
        names, sizes = (spec[0],), (count,)
    else:
        raise ValueError(
            f"sharding mesh {spec!r}: give an axis name (\"model\") or axis sizes ({{\"data\": 2, \"model\": 2}})"
        )
    if int(np.prod(sizes)) != count:
        raise ValueError(
            f"sharding mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, but device_ids gives {count}"
        )
    return names, sizes


@dataclass
class MeshLayout:
    """The mesh and the named shardings of the weights and the inputs."""

    mesh: Mesh
    param_shardings: dict[str, NamedSharding]
    input_shardings: list[NamedSharding]

    @classmethod
    def from_options(
        cls, options: Any, devices: Sequence[jax.Device], params: Mapping[str, np.ndarray], n_inputs: int
    ) -> "MeshLayout":
        if not isinstance(options, Mapping):
            raise ValueError(f"options['sharding'] must be a dict with 'mesh', 'params', 'inputs', got {options!r}")
        unknown = set(options) - {"mesh", "params", "inputs"}
        if unknown:
            raise ValueError(f"options['sharding'] has unknown keys {sorted(unknown)}; known: mesh, params, inputs")
        names, sizes = _mesh_shape(options.get("mesh"), len(devices))
        mesh = Mesh(np.array(devices, dtype=object).reshape(sizes), names)

        declared = dict(options.get("params") or {})
        missing = sorted(set(declared) - set(params))
        if missing:
            raise ValueError(f"sharding params {missing} are not in the weights file (it holds {sorted(params)})")
        param_shardings = {}
        for name, array in params.items():
            spec = _partition_spec(declared.get(name), f"params['{name}']")
            _check_divisible(spec, array.shape, mesh, f"weight '{name}'")
            param_shardings[name] = NamedSharding(mesh, spec)

        raw_inputs = options.get("inputs")
        raw_inputs = [None] * n_inputs if raw_inputs is None else list(raw_inputs)
        if len(raw_inputs) != n_inputs:
            raise ValueError(f"sharding inputs lists {len(raw_inputs)} specs, but the model has {n_inputs} inputs")
        inputs = [NamedSharding(mesh, _partition_spec(s, f"inputs[{i}]")) for i, s in enumerate(raw_inputs)]
        for i, sharding in enumerate(inputs):
            for axis in jax.tree.leaves(tuple(sharding.spec)):
                if axis not in mesh.shape:
                    raise ValueError(f"sharding inputs[{i}] names axis {axis!r}; the mesh has {list(mesh.shape)}")
        return cls(mesh, param_shardings, inputs)


def _check_divisible(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, what: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"{what} has {len(shape)} dimensions but its PartitionSpec {spec} names {len(spec)}")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            if axis not in mesh.shape:
                raise ValueError(f"{what}: PartitionSpec {spec} names axis {axis!r}; the mesh has {list(mesh.shape)}")
        parts = int(np.prod([mesh.shape[a] for a in axes]))
        if dim % parts:
            raise ValueError(f"{what} {tuple(shape)}: dimension {dim} does not split into {parts} equal parts ({spec})")
