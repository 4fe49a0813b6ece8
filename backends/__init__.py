"""Model runtimes, chosen by ``declare_model(..., model_format=...)``.

A backend is a function ``load(files, options, device) -> ModelRuntime``. The JAX
formats (``jax_export``, ``jax_function``) ship here; other accelerators (Ascend
first) plug in with `register_backend`, either from their own package at import
time or through the ``mserve.backends`` entry-point group, which is read once on the
first lookup of an unknown format.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """What a model input or output holds. ``None`` in ``shape`` is a dimension the
    artifact leaves free (symbolic); ``shape`` itself is ``None`` when unknown."""

    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.dtype.name}[?]"
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.name}[{dims}]"


def concrete_shapes(specs: list[TensorSpec], batch: int | None) -> list[tuple[int, ...]] | None:
    """Input shapes for a warm-up call: fixed dims as given, a free leading dim set to
    ``batch``. ``None`` when some other dimension is free (no shape to guess)."""
    shapes = []
    for spec in specs:
        if spec.shape is None:
            return None
        dims = list(spec.shape)
        if dims and dims[0] is None:
            if batch is None:
                return None
            dims[0] = batch
        if any(d is None for d in dims):
            return None
        shapes.append(tuple(dims))
    return shapes


class ModelRuntime(Protocol):
    """A loaded model on one device. ``predict`` gets arrays that already match
    ``inputs`` (the model stage checks dtypes and shapes first)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        """Prepare (compile) every listed set of input shapes ahead of requests."""
        ...

    @property
    def compile_count(self) -> int: ...


Loader = Callable[[list[Path], dict[str, Any], Any], ModelRuntime]

_BACKENDS: dict[str, Loader] = {}
_lock = threading.Lock()
_entry_points_read = False


def register_backend(model_format: str, loader: Loader) -> None:
    """Make ``model_format`` loadable; the name is matched case-insensitively."""
    with _lock:
        _BACKENDS[model_format.lower()] = loader


def get_backend(model_format: str) -> Loader:
    global _entry_points_read
    key = model_format.lower()
    with _lock:
        if key not in _BACKENDS and not _entry_points_read:
            _entry_points_read = True
            for ep in entry_points(group="mserve.backends"):
                _BACKENDS.setdefault(ep.name.lower(), ep.load())
        loader = _BACKENDS.get(key)
        known = sorted(_BACKENDS)
    if loader is None:
        raise KeyError(f"unknown model_format '{model_format}'; known formats: {', '.join(known)}")
    return loader


def _load_jax_export(files: list[Path], options: dict[str, Any], device: Any) -> ModelRuntime:
    from .jax_export import load

    return load(files, options, device)


def _load_jax_function(files: list[Path], options: dict[str, Any], device: Any) -> ModelRuntime:
    from .jax_function import load

    return load(files, options, device)


# JAX is imported lazily so that `mserve --help` and the client commands stay fast.
register_backend("jax_export", _load_jax_export)
register_backend("jax_function", _load_jax_function)
