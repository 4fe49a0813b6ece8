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


_CALL_FORMS = "the inputs can be call(x1, x2) for single instance or call([[x1, x2], [x1, x2]]) for multi instances."


@dataclass(eq=False)  # a declared model is itself: identity equality and hash
class Model:
    """A model declared by servable_config.py; ``add_stage(model, ...)`` runs it, and
    ``model.call(...)`` runs it from inside a Python stage. ``context`` and
    ``config_file`` are kept as declared, for the backends that use them."""

    model_files: list[str]
    model_format: str
    with_batch_dim: bool = True
    without_batch_dim_inputs: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    context: Any = None
    config_file: str | None = None

    @property
    def model_key(self) -> str:
        """MindSpore Serving's name for the model (in Model.call errors)."""
        return ";".join(self.model_files)

    def call(self, *args: Any, subgraph: int = 0) -> Any:
        """Run the model from a Python stage, through the same batcher as a model stage.

        ``model.call(x1, x2)`` runs one instance and returns its outputs: the array
        itself for a model with one output, a tuple for several.
        ``model.call([[x1, x2], [x1b, x2b]])`` (a list or tuple of instances, each a
        list or tuple of inputs) returns a tuple with one tuple of outputs per
        instance, so callers write ``for inst in outputs: y = inst[0]``. Failures
        raise ``RuntimeError`` (``Model(file).call() failed: ...``). ``subgraph``
        picks one graph of a model of several files (for backends that load each
        file as a graph, such as MindIR's)."""
        if isinstance(subgraph, bool) or not isinstance(subgraph, int) or subgraph < 0:
            raise RuntimeError(f"Parameter 'subgraph' should be int >= 0, but actually {subgraph!r}")
        name = f"Model({self.model_key}{f', subgraph={subgraph}' if subgraph else ''}).call()"
        if not args:
            raise RuntimeError(f"{name} failed: no inputs provided, {_CALL_FORMS}")
        if len(args) == 1 and isinstance(args[0], (tuple, list)):
            if not all(isinstance(instance, (tuple, list)) for instance in args[0]):
                raise RuntimeError(f"{name} failed: inputs format invalid, {_CALL_FORMS}")
        runner = current_version.get()
        if runner is None:
            raise RuntimeError(f"{name} failed: Model.call can only be used inside a stage while mserve runs a request")
        return runner.call_model(self, args, subgraph)


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
current_version: contextvars.ContextVar[Any] = contextvars.ContextVar("mserve_version", default=None)


def _definition(api: str) -> ServableDefinition:
    if _defining is None:
        raise RuntimeError(f"register.{api} must be called from servable_config.py while mserve loads it")
    return _defining


def declare_model(
    model_file: str | Sequence[str],
    model_format: str,
    with_batch_dim: bool = True,
    options: dict[str, Any] | None = None,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
    context: Any = None,
    config_file: str | None = None,
) -> Model:
    """Declare a model whose file(s) live in every version folder; MindSpore
    Serving's signature, parameter order and checks.

    ``with_batch_dim=True``: the model's first dimension is the batch; instances
    are stacked into it. ``options``: the model's settings for its backend (mserve: a
    dict, e.g. ``jax_function``'s ``function`` and ``input_specs``, or batching).
    ``without_batch_dim_inputs``: indices of inputs that carry no batch dimension
    (taken from the first instance). ``context`` and ``config_file`` (a path relative
    to servable_config.py's folder, or absolute) are kept on the `Model` for its
    backend.
    """
    definition = _definition("declare_model")
    if not isinstance(with_batch_dim, bool):
        raise ServableLoadError(f"Parameter 'with_batch_dim' should be bool, but actually {type(with_batch_dim)}")
    files = _str_tuple("model_file", model_file)
    if not isinstance(model_format, str):
        raise ServableLoadError(f"Parameter 'model_format' should be str, but actually {type(model_format)}")
    if not model_format:
        raise ServableLoadError("Parameter 'model_format' should not be empty str")
    no_batch: tuple[int, ...] = ()
    if without_batch_dim_inputs:
        no_batch = _int_tuple("without_batch_dim_inputs", without_batch_dim_inputs)
    if options is not None and not isinstance(options, dict):
        raise ServableLoadError(f"Parameter 'options' should be None or dict, but gotten {type(options)}")
    if config_file is not None and (not isinstance(config_file, str) or not config_file):
        raise ServableLoadError(f"Parameter 'config_file' should be a non-empty str, but actually {config_file!r}")
    model = Model(
        list(files), model_format, with_batch_dim, no_batch, dict(options or {}), len(definition.models),
        context, config_file,
    )
    definition.models.append(model)
    return model


def _str_tuple(name: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, (tuple, list)):
        raise ServableLoadError(f"Parameter '{name}' should be str or tuple/list of str, but actually {type(values)}")
    seen: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ServableLoadError(f"The item of parameter '{name}' should be str, but actually {type(value)}")
        if not value:
            raise ServableLoadError(f"The item of parameter '{name}' should not be empty str")
        if value in seen:
            raise ServableLoadError(f"The item value '{value}' in parameter '{name}' should not be repeated")
        seen.append(value)
    if not seen:
        raise ServableLoadError(f"Parameter '{name}' should not be empty")
    return tuple(seen)


def _int_tuple(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)):
        raise ServableLoadError(f"Parameter '{name}' should be int or tuple/list of int, but actually {type(values)}")
    seen: list[int] = []
    for value in values:
        if value in seen:
            raise ServableLoadError(f"The item value '{value}' in parameter '{name}' should not be repeated")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ServableLoadError(f"The item value '{value}' in parameter '{name}' should be int, but actually {type(value)}")
        if value < 0:
            raise ServableLoadError(f"The item value '{value}' in parameter '{name}' should be >= 0")
        seen.append(value)
    return tuple(seen)


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
