"""``model_format="jax_function"``: a JAX function from servable_config.py plus weights.

    model = register.declare_model(
        model_file="weights.npz",              # or weights.safetensors
        model_format="jax_function",
        options={"function": predict,          # predict(params, *inputs)
                 "input_specs": [("b, 4", "float32")]},
    )

``params`` is the weight file as a dict of arrays (name -> array), put on the device
once. ``input_specs`` gives each input's shape (``jax.export.symbolic_shape`` syntax;
a leading ``b`` is a free batch size) and dtype. The function is exported with those
specs at load time, so shapes, dtypes and mistakes in the function surface at start,
exactly as for a ``jax_export`` artifact.

With ``options["sharding"]`` the model is one instance spanning all the servable's
``device_ids``: the weights are split over a device mesh as named there, and the
function is compiled once for the mesh (`mserve.backends.jax_sharding`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from jax import export

from .jax_runtime import JaxProgram, jax_devices, resolve_device, specs_from_avals
from .jax_sharding import MeshLayout


def load_weights(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    raise ValueError(f"{path}: weights must be .npz or .safetensors")


def parse_input_specs(options: dict[str, Any]) -> list[jax.ShapeDtypeStruct]:
    raw = options.get("input_specs")
    if not raw:
        raise ValueError("jax_function needs options['input_specs'], e.g. [('b, 4', 'float32')]")
    specs = []
    scope = export.SymbolicScope()
    for i, item in enumerate(raw):
        try:
            shape, dtype = item
            dims = export.symbolic_shape(shape, scope=scope) if isinstance(shape, str) else tuple(shape)
            specs.append(jax.ShapeDtypeStruct(dims, np.dtype(dtype)))
        except Exception as exc:
            raise ValueError(f"input_specs[{i}] = {item!r} is not (shape, dtype): {exc}") from exc
    return specs


def load(files: list[Path], options: dict[str, Any], devices: Sequence[Any]) -> JaxProgram:
    """Load on one device, or as one instance over ``devices`` when ``options``
    declare a ``sharding`` (see `mserve.backends.jax_sharding`)."""
    fn = options.get("function")
    if not callable(fn):
        raise ValueError("jax_function needs options['function'], a callable f(params, *inputs)")
    if len(files) != 1:
        raise ValueError(f"jax_function expects one weights file, got {len(files)}")
    params = load_weights(files[0])
    specs = parse_input_specs(options)
    param_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}
    try:
        exported = export.export(jax.jit(fn))(param_specs, *specs)
    except Exception as exc:
        raise ValueError(f"tracing {getattr(fn, '__name__', fn)} with input_specs failed: {exc}") from exc
    n_params = len(jax.tree.leaves(param_specs))
    inputs = specs_from_avals(exported.in_avals[n_params:])
    outputs = specs_from_avals(exported.out_avals)
    if "sharding" in options:
        layout = MeshLayout.from_options(options["sharding"], jax_devices(devices), params, len(inputs))
        return JaxProgram(
            fn, inputs, outputs, layout.mesh.devices.flat[0], leading=(params,), devices=list(layout.mesh.devices.flat),
            leading_shardings=(layout.param_shardings,), input_shardings=layout.input_shardings,
        )
    return JaxProgram(fn, inputs, outputs, resolve_device(devices), leading=(params,))
