"""A distributed model written as a Python file: the JAX stand-in for MindSpore's
per-device MindIR files of a distributed servable.

MindSpore's ``distributed.declare_servable`` names no model in servable_config.py;
the model comes as files. mserve's model file (``jax_model.py`` by default, in the
version folder) defines::

    function = predict                       # predict(params, *inputs)
    input_specs = [("128, 96", "float32")]   # as jax_function's options
    sharding = {"mesh": "model", "params": {"w": P(None, "model")}}
    weights = "matmul.safetensors"           # beside this file (.safetensors or .npz)

which is exactly a ``jax_function`` model's options plus its weights file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REQUIRED = ("function", "input_specs", "sharding", "weights")


def load_model_module(path: Path) -> tuple[dict[str, Any], Path]:
    """The model's ``jax_function`` options and its weights file."""
    path = Path(path)
    if path.suffix != ".py":
        raise ValueError(f"{path}: a distributed model file is a Python file defining {', '.join(REQUIRED)}")
    spec = importlib.util.spec_from_file_location(f"mserve_model_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"{path} raised {type(exc).__name__}: {exc}") from exc
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{path} does not define {', '.join(missing)} (a distributed model file defines "
                         f"{', '.join(REQUIRED)})")
    options = {"function": module.function, "input_specs": module.input_specs, "sharding": module.sharding}
    weights = path.parent / str(module.weights)
    if not weights.is_file():
        raise ValueError(f"{path}: its weights file {weights} does not exist")
    return options, weights
