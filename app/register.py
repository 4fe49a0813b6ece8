"""The servable_config.py API, MindSpore Serving's ``register`` module in shape.

``servable_config.py`` declares models and registers methods; a method's body is run
once, at load time, with placeholder inputs, and each `add_stage` call records one
pipeline stage. So the method function describes the wiring, it does not compute::

    from mserve import register

    model = register.declare_model(model_file="add.jaxexport", model_format="jax_export",
                                   with_batch_dim=False)

    @register.register_method(output_names=["y"])
    def add_common(x1, x2):
        y = register.add_stage(model, x1, x2, outputs_count=1)
        return y
"""

from __future__ import annotations

import contextvars
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import ServableLoadError


@dataclass(eq=False)  # a declared model is itself: identity equality and hash
class Model:
    """A model declared by servable_config.py; ``add_stage(model, ...)`` runs it, and
    ``model.call(...)`` runs it from inside a Python stage."""

    model_files: list[str]
    model_format: str
    with_batch_dim: bool = True
    without_batch_dim_inputs: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    def call(self, *args: Any, subgraph: int = 0) -> Any:
        """Run the model from a Python stage on the inputs of one instance, or on a
        list of instances (each a tuple of inputs). Returns the outputs in the same
        form: one value (one output), a tuple (several), or a list of those."""
        runner = _current_version.get()
        if runner is None:
            raise RuntimeError("Model.call can only be used inside a stage while mserve runs a request")
        return runner.call_model(self, args)


@dataclass(frozen=True)
class Slot:
    """A placeholder for a value flowing through a method: an input or a stage output."""

    index: int
    label: str


@dataclass
class StageDef:
    target: Callable[..., Any] | Model
    inputs: list[Slot]
    outputs: list[Slot]
    batch_size: int | None
    tag: str

    @property
    def is_model(self) -> bool:
        return isinstance(self.target, Model)


@dataclass
class MethodDef:
    name: str
    input_names: list[str]
    output_names: list[str]
    stages: list[StageDef]
    output_slots: list[Slot]
    slot_count: int


@dataclass
class ServableDefinition:
    """Everything servable_config.py declared: models and methods."""

    name: str
    models: list[Model] = field(default_factory=list)
    methods: dict[str, MethodDef] = field(default_factory=dict)


# The definition being filled while servable_config.py runs, and the method being
# traced while its body runs. Loads are serialized by the loader's lock.
_defining: ServableDefinition | None = None
_tracing: list[Any] | None = None  # [stages, next_slot_index]
_define_lock = threading.Lock()

# The loaded version that the current request runs on, so Model.call can find the
# runtime of the right version when several are served at once.
_current_version: contextvars.ContextVar[Any] = contextvars.ContextVar("mserve_version", default=None)


def _definition(api: str) -> ServableDefinition:
    if _defining is None:
        raise RuntimeError(f"register.{api} must be called from servable_config.py while mserve loads it")
    return _defining


def declare_model(
    model_file: str | Sequence[str],
    model_format: str,
    with_batch_dim: bool = True,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
    options: dict[str, Any] | None = None,
    **ignored: Any,
) -> Model:
    """Declare a model whose file(s) live in every version folder.

    ``with_batch_dim=True``: the model's first dimension is the batch; instances
    are stacked into it. ``without_batch_dim_inputs``: indices of inputs that carry no
    batch dimension (taken from the first instance). Extra MindSpore arguments such as
    ``context`` or ``config_file`` are accepted and ignored.
    """
    definition = _definition("declare_model")
    files = [model_file] if isinstance(model_file, str) else list(model_file)
    if not files or not all(isinstance(f, str) and f for f in files):
        raise ServableLoadError(f"declare_model: model_file must be a file name or a list of them, got {model_file!r}")
    if not isinstance(model_format, str):
        raise ServableLoadError(f"declare_model: model_format must be a string, got {model_format!r}")
    if without_batch_dim_inputs is None:
        no_batch: tuple[int, ...] = ()
    elif isinstance(without_batch_dim_inputs, int):
        no_batch = (without_batch_dim_inputs,)
    else:
        no_batch = tuple(without_batch_dim_inputs)
    model = Model(files, model_format, bool(with_batch_dim), no_batch, dict(options or {}), len(definition.models))
    definition.models.append(model)
    return model


def register_method(output_names: str | Sequence[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a method; its parameter names are the
    method's input names and ``output_names`` its outputs, in order."""
    names = [output_names] if isinstance(output_names, str) else list(output_names)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        global _tracing
        definition = _definition("register_method")
        params = list(inspect.signature(fn).parameters.values())
        for p in params:
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                raise ServableLoadError(f"method {fn.__name__}: parameter {p.name} must be a plain positional parameter")
        if fn.__name__ in definition.methods:
            raise ServableLoadError(f"method {fn.__name__} is registered twice")
        inputs = [Slot(i, f"input '{p.name}'") for i, p in enumerate(params)]
        _tracing = [[], len(inputs)]
        try:
            result = fn(*inputs)
            stages, slot_count = _tracing
        finally:
            _tracing = None
        returned = list(result) if isinstance(result, (tuple, list)) else [result]
        if not all(isinstance(r, Slot) for r in returned):
            raise ServableLoadError(
                f"method {fn.__name__} must return its inputs or add_stage outputs, got {result!r}"
            )
        if len(returned) != len(names):
            raise ServableLoadError(
                f"method {fn.__name__} returns {len(returned)} values but output_names has {len(names)}: {names}"
            )
        definition.methods[fn.__name__] = MethodDef(
            fn.__name__, [p.name for p in params], names, stages, returned, slot_count
        )
        return fn

    return decorate


def add_stage(
    stage: Callable[..., Any] | Model,
    *args: Any,
    outputs_count: int,
    batch_size: int | None = None,
    tag: str | None = None,
) -> Any:
    """Add a stage to the method being registered; returns its output placeholder(s).

    ``stage`` is a Python function or a declared `Model`. A function with
    ``batch_size=None`` is called once per instance; with ``0`` (all) or ``N`` it gets
    a list of instances (tuples of inputs) and returns one output entry per instance.
    ``tag`` names the stage in errors: ``tag="Preprocess"`` -> ``Preprocess Failed: ...``.
    """
    if _tracing is None:
        raise RuntimeError("register.add_stage must be called inside a function decorated with register_method")
    stages, next_slot = _tracing
    label = tag or (f"model {stage.model_files[0]}" if isinstance(stage, Model) else getattr(stage, "__name__", "stage"))
    if not isinstance(stage, Model) and not callable(stage):
        raise ServableLoadError(f"add_stage: {stage!r} is neither a Python function nor a declared model")
    if isinstance(stage, Model) and stage not in _definition("add_stage").models:
        raise ServableLoadError("add_stage: the model was not declared by this servable_config.py")
    for i, arg in enumerate(args):
        if not isinstance(arg, Slot):
            raise ServableLoadError(
                f"add_stage({label}): argument {i} is {arg!r}; stage inputs must be method inputs or outputs of earlier stages"
            )
    if not isinstance(outputs_count, int) or outputs_count < 1:
        raise ServableLoadError(f"add_stage({label}): outputs_count must be a positive integer, got {outputs_count!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 0):
        raise ServableLoadError(f"add_stage({label}): batch_size must be None, 0 or a positive integer")
    if not isinstance(stage, Model):
        # A batched function gets one argument: the list of instances.
        _check_function_arity(stage, len(args) if batch_size is None else 1, label)
    outputs = [Slot(next_slot + i, f"output {i} of {label}") for i in range(outputs_count)]
    stages.append(StageDef(stage, list(args), outputs, batch_size, tag or _default_tag(stage)))
    _tracing[1] = next_slot + outputs_count
    return outputs[0] if outputs_count == 1 else tuple(outputs)


def _default_tag(stage: Callable[..., Any] | Model) -> str:
    if isinstance(stage, Model):
        return "Model"
    return getattr(stage, "__name__", "Stage")


def _check_function_arity(fn: Callable[..., Any], count: int, label: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    try:
        sig.bind(*range(count))
    except TypeError as exc:
        raise ServableLoadError(f"add_stage({label}): the function takes {sig}, but {count} inputs are wired: {exc}") from None


def defining(definition: ServableDefinition) -> "_Defining":
    """Context manager for the loader: register.* calls fill ``definition``."""
    return _Defining(definition)


class _Defining:
    def __init__(self, definition: ServableDefinition):
        self.definition = definition

    def __enter__(self) -> ServableDefinition:
        global _defining
        _define_lock.acquire()
        _defining = self.definition
        return self.definition

    def __exit__(self, *exc: Any) -> None:
        global _defining
        _defining = None
        _define_lock.release()
