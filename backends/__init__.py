"""Model backends: what runs a declared model, chosen by (model_format, device type).

A `Backend` declares the model formats and device types it serves, whether it can
decrypt model files (``dec_key``/``dec_mode``) and whether one model instance can span
several devices (sharding). Its ``load`` gets a `LoadRequest` (files, options, device
or device group, config_file, context, dec_key/dec_mode) and returns a `ModelRuntime`.

JAX (``jax_export``, ``jax_function``) is registered here like any other backend;
MindSpore (``MindIR``) comes through mserve's own ``mserve.backends`` entry point, and
third-party packages plug in the same way (or call `register_backend`). Entry points
are read once, on the first lookup, and must stay cheap to import: a backend imports
its framework inside ``load``.

`load_model` is the one call that loads a model (device processes call it too);
`placement` says which device groups get an instance. When nothing serves a
(format, device type) pair, the error lists what is installed and what to install.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np


class Device(NamedTuple):
    """One device: ``type`` is lower-case (``"cpu"``, ``"gpu"``, ``"ascend"``), or
    ``None`` before a backend has picked its default type."""

    type: str | None
    id: int

    def __str__(self) -> str:
        return f"{self.type or 'default'}:{self.id}"


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
    """A loaded model instance, on one device or spanning a device group.

    Required: ``inputs``, ``outputs`` and ``predict`` (one batch in, outputs out; the
    arrays already match ``inputs``, the model stage checked them). Optional, used
    when present: ``warm_up(shapes)`` (prepare every listed set of input shapes ahead
    of requests), ``close()`` (release device memory; called once no request uses the
    instance), ``devices`` (the `Device`s it runs on), ``compile_count``.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class LoadRequest:
    """Everything a backend's ``load`` gets for one model instance.

    ``devices`` is one device, or the group a sharded model spans (all of one type).
    ``files`` are the model's files in declaration order (several: one graph each,
    for ``Model.call(subgraph=i)``). ``config_file`` is resolved against the
    servable's folder. ``dec_key`` is ``None`` unless the servable was started with
    one; only backends declared ``can_decrypt`` ever see it.
    """

    files: list[Path]
    options: dict[str, Any]
    devices: tuple[Device, ...]
    config_file: Path | None = None
    context: dict[str, Any] | None = None
    dec_key: bytes | None = None
    dec_mode: str = "AES-GCM"

    @property
    def device(self) -> Device:
        """The device of an instance that runs on one device."""
        if len(self.devices) != 1:
            raise ValueError(f"this model spans {len(self.devices)} devices; use request.devices")
        return self.devices[0]

    @property
    def device_type(self) -> str:
        return self.devices[0].type or ""


Loader = Callable[[LoadRequest], ModelRuntime]
ANY_DEVICE = "*"


@dataclass(frozen=True)
class Backend:
    """A runtime for some model formats on some device types.

    ``requires``: a Python module the backend needs (checked with importlib, without
    importing it); ``install``: what to run when it is missing. ``default_device_type``
    answers the type to use when the servable names none. ``shards(options)`` says
    whether a model's options ask for one instance spanning all its devices (needs
    ``can_shard``).
    """

    name: str
    formats: tuple[str, ...]
    device_types: tuple[str, ...]
    load: Loader
    can_decrypt: bool = False
    can_shard: bool = False
    requires: str | None = None
    install: str | None = None
    default_device_type: Callable[[], str] | None = None
    shards: Callable[[dict[str, Any]], bool] | None = None
    description: str = ""

    def available(self) -> bool:
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires) is not None
        except (ImportError, ValueError):
            return False

    def serves(self, model_format: str, device_type: str | None) -> bool:
        if model_format.lower() not in (f.lower() for f in self.formats):
            return False
        return device_type is None or ANY_DEVICE in self.device_types or device_type in self.device_types

    def summary(self) -> str:
        """``jax_export: jax_export on cpu, gpu, tpu``, plus what to install if missing."""
        kinds = "any device type" if ANY_DEVICE in self.device_types else ", ".join(self.device_types)
        text = f"{self.name}: {', '.join(self.formats)} on {kinds}"
        if not self.available():
            text += f" (not installed: {self.install or 'pip install ' + str(self.requires)})"
        return text


class BackendError(LookupError):
    """No installed backend can load a model as asked (format, device type, options)."""


# What to install for formats and device types no installed package announces.
_HINTS = {
    "mindir": "pip install 'mserve[mindspore]'",
    "ascend": "pip install 'mserve[mindspore]' (MindIR models)",
    "gpu": "pip install 'mserve[cuda]' (JAX models) or 'mserve[mindspore]' with MindSpore's GPU build",
}

_backends: list[Backend] = []  # newest registration first: it wins a tie
_BUILTIN = {"jax_export", "jax_function"}
_lock = threading.Lock()
_entry_points_lock = threading.Lock()  # held while entry points load (they may import)
_entry_points_read = False
log = logging.getLogger("mserve.backends")


def normalize_device_type(device_type: str | None) -> str | None:
    """Lower-case, ``cuda`` -> ``gpu``, ``None``/"" /"none" -> ``None`` (the default)."""
    if device_type is None:
        return None
    kind = str(device_type).strip().lower()
    if kind in ("", "none"):
        return None
    return "gpu" if kind == "cuda" else kind


def register_backend(backend: Backend | str, loader: Callable[..., ModelRuntime] | None = None) -> Backend:
    """Make a backend available; a later registration with the same name replaces
    the earlier one, and the newest registration wins over older ones for the
    same (format, device type).

    ``register_backend("fmt", load)`` is the short form: ``load(files, options,
    device)`` serves format ``fmt`` on CPU, GPU and Ascend, cannot decrypt and
    cannot take ``config_file`` or ``context``.
    """
    if isinstance(backend, str):
        if loader is None:
            raise TypeError("register_backend(model_format, loader) needs the loader")
        backend = simple_backend(backend, loader)
    elif not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a Backend or (model_format, loader), got {backend!r}")
    with _lock:
        _backends[:] = [b for b in _backends if b.name != backend.name]
        _backends.insert(0, backend)
    return backend


def unregister_backend(name: str) -> bool:
    """Forget the backend called ``name``; whether there was one."""
    with _lock:
        before = len(_backends)
        _backends[:] = [b for b in _backends if b.name != name]
        return len(_backends) != before


def simple_backend(model_format: str, loader: Callable[..., ModelRuntime]) -> Backend:
    """A `Backend` around a three-argument ``load(files, options, device)``, on the
    device types MindSpore Serving knows (CPU, GPU, Ascend)."""

    def load(request: LoadRequest) -> ModelRuntime:
        if request.config_file is not None or request.context:
            raise ValueError(f"the {model_format} loader takes no config_file or context; remove them")
        return loader(request.files, request.options, request.device)

    return Backend(model_format, (model_format,), ("cpu", "gpu", "ascend"), load)


def _read_entry_points() -> None:
    """Register what installed packages announce in the ``mserve.backends`` group: a
    `Backend`, or a three-argument loader for the format named by the entry point.
    They rank below backends registered in code and above the built-in JAX ones."""
    global _entry_points_read
    with _entry_points_lock:
        if _entry_points_read:
            return
        for ep in entry_points(group="mserve.backends"):
            try:
                target = ep.load()
            except Exception as exc:  # a broken plugin must not hide the others
                log.warning("backend entry point %s (%s) failed to load: %s", ep.name, ep.value, exc)
                continue
            if isinstance(target, Backend):
                backend = target
            elif callable(target):
                backend = simple_backend(ep.name, target)
            else:
                log.warning("backend entry point %s (%s) is neither a Backend nor a loader", ep.name, ep.value)
                continue
            with _lock:
                if any(b.name == backend.name for b in _backends):
                    continue  # registered in code: that one stays
                builtin = [i for i, b in enumerate(_backends) if b.name in _BUILTIN]
                _backends.insert(builtin[0] if builtin else len(_backends), backend)
        _entry_points_read = True


def installed_backends() -> list[Backend]:
    """Every registered backend (entry points included), newest first."""
    _read_entry_points()
    with _lock:
        return list(_backends)


def _installed_text() -> str:
    return "; ".join(b.summary() for b in installed_backends())


def find_backend(model_format: str, device_type: str | None) -> tuple[Backend, str]:
    """The backend that serves ``model_format`` on ``device_type`` (``None``: the first
    available backend for the format, on its default type), and the device type.
    Raises `BackendError` listing what is installed and what to install."""
    kind = normalize_device_type(device_type)
    candidates = [b for b in installed_backends() if b.serves(model_format, kind)]
    usable = [b for b in candidates if b.available()]
    if usable:
        backend = usable[0]
        if kind is None:
            kind = backend.default_device_type() if backend.default_device_type else "cpu"
        return backend, kind
    where = f"model_format '{model_format}'" + (f" on device type '{kind}'" if kind else "")
    if candidates:
        needs = "; ".join(f"backend '{b.name}' serves it but is not installed: "
                          f"{b.install or 'pip install ' + str(b.requires)}" for b in candidates)
        raise BackendError(f"no installed backend serves {where}; {needs}")
    known_format = any(b.serves(model_format, None) for b in installed_backends())
    hint = _HINTS.get(model_format.lower()) or (_HINTS.get(kind) if kind else None)
    advice = f"install one ({hint}) or write a backend plugin (README: Writing a backend plugin)" if hint else \
        "write a backend plugin for it (README: Writing a backend plugin)"
    first = f"no installed backend serves {where}" if known_format else f"unknown model_format '{model_format}'"
    raise BackendError(f"{first}. Installed backends: {_installed_text()}. To serve it: {advice}")


def check_device_type(device_type: str | None) -> str | None:
    """The normalized type, or `BackendError` when no backend, installed or not,
    declares it. A type only a missing framework runs on passes: each model's
    lookup then says what to install for its format."""
    kind = normalize_device_type(device_type)
    if kind is None:
        return None
    declared = {t for b in installed_backends() for t in b.device_types}
    if kind in declared or ANY_DEVICE in declared:
        return kind
    hint = _HINTS.get(kind)
    raise BackendError(
        f"device_type '{device_type}': no installed backend runs on it. Installed: {_installed_text()}"
        + (f". To serve it: {hint}" if hint else "")
    )


def placement(backend: Backend, options: dict[str, Any], devices: Sequence[Device]) -> list[tuple[Device, ...]]:
    """The device groups that each get one model instance: every device alone, or
    all of them together when the model declares a sharding."""
    if backend.shards is not None and backend.shards(options):
        if not backend.can_shard:
            raise BackendError(f"backend '{backend.name}' cannot shard a model over several devices")
        return [tuple(devices)]
    return [(d,) for d in devices]


def load_model(
    model_format: str,
    files: Sequence[Path],
    options: dict[str, Any],
    devices: Device | Sequence[Device],
    config_file: Path | None = None,
    context: dict[str, Any] | None = None,
    dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM",
    backend: Backend | None = None,
) -> ModelRuntime:
    """Load one model instance on ``devices`` (a device, or the group a sharded
    model spans; a picklable description, so a device process can do this)."""
    group = (devices,) if isinstance(devices, Device) else tuple(devices)
    if not group:
        raise ValueError("load_model needs at least one device")
    kinds = {d.type for d in group}
    if len(kinds) != 1:
        raise ValueError(f"a model instance runs on one device type, got {sorted(map(str, kinds))}")
    if backend is None:
        backend, kind = find_backend(model_format, group[0].type)
        group = tuple(Device(kind, d.id) for d in group)
    if dec_key is not None and not backend.can_decrypt:
        raise BackendError(
            f"backend '{backend.name}' ({model_format}) cannot decrypt models, but the servable was started with a "
            f"dec_key: serve the decrypted model file without dec_key/dec_mode, or an encrypted format whose backend "
            f"decrypts (MindIR: pip install 'mserve[mindspore]')"
        )
    request = LoadRequest(list(files), dict(options), group, config_file, context, dec_key, dec_mode)
    runtime = backend.load(request)
    if not hasattr(runtime, "devices"):
        try:
            runtime.devices = list(group)  # type: ignore[attr-defined]
        except AttributeError:
            pass  # a runtime with __slots__ keeps its own notion
    return runtime


def _refuse_unused(request: LoadRequest, backend: str) -> None:
    """JAX backends have nothing to apply ``config_file``/``context`` to: say so."""
    if request.config_file is not None:
        raise ValueError(f"the {backend} backend has no use for config_file ({request.config_file}); remove it")
    if request.context:
        raise ValueError(f"the {backend} backend has no use for context {request.context!r}; remove it")


def _load_jax_export(request: LoadRequest) -> ModelRuntime:
    from .jax_export import load

    _refuse_unused(request, "jax_export")
    return load(request.files, request.options, request.devices)


def _load_jax_function(request: LoadRequest) -> ModelRuntime:
    from .jax_function import load

    _refuse_unused(request, "jax_function")
    return load(request.files, request.options, request.devices)


def _jax_default_device_type() -> str:
    import jax

    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


# JAX is imported lazily so that `mserve --help` and the client commands stay fast.
# One backend per JAX format: only jax_function models can declare a sharding.
register_backend(Backend(
    "jax_export", ("jax_export",), ("cpu", "gpu", "tpu"), _load_jax_export,
    default_device_type=_jax_default_device_type, description="serialized jax.export artifacts",
))
register_backend(Backend(
    "jax_function", ("jax_function",), ("cpu", "gpu", "tpu"), _load_jax_function, can_shard=True,
    default_device_type=_jax_default_device_type, shards=lambda options: "sharding" in options,
    description="a JAX function from servable_config.py plus a weights file",
))
