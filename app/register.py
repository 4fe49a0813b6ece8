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
import functools
import inspect
import logging
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .errors import ServableLoadError
from .serving.device_info import (  # noqa: F401  (MindSpore's names, re-exported)
    DEPRECATED_OPTIONS, AclOptions, AscendDeviceInfo, Context, CPUDeviceInfo, GpuOptions, GPUDeviceInfo,
)
from .serving.legacy_calls import LegacyCalls


log = logging.getLogger("mserve.register")

_CALL_FORMS = "the inputs can be call(x1, x2) for single instance or call([[x1, x2], [x1, x2]]) for multi instances."


@dataclass(eq=False)  # a declared model is itself: identity equality and hash
class Model:
    """A model declared by servable_config.py; ``add_stage(model, ...)`` runs it, and
    ``model.call(...)`` runs it from inside a Python stage. ``context`` and
    ``config_file`` are kept as declared, for the backends that use them."""

    model_files: list[str]
    model_format: str = ""
    with_batch_dim: bool = True
    without_batch_dim_inputs: tuple[int, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    index: int = -1
    context: Any = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model_files, str):  # MindSpore's Model(model_key): files joined by ';'
            self.model_files = self.model_files.split(";")

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
        if self.index < 0:
            raise RuntimeError(f"{name} failed: the model is not declared")
        runner = current_version.get()
        if runner is None:
            raise RuntimeError(f"{name} failed: Model.call can only be used inside a stage while mserve runs a request")
        return runner.call_model(self, args, subgraph)


@dataclass(frozen=True)
class _TensorDef:
    """A placeholder for a value flowing through a method: an input or a stage output.
    Its class is named as MindSpore Serving's (``_TensorDef``), because users read the
    name in errors such as ``cannot unpack non-iterable _TensorDef object``."""

    index: int
    label: str


Slot = _TensorDef


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

    @functools.cached_property
    def function_inputs(self) -> tuple[int, ...]:
        """The method inputs (their slots) that a Python stage reads."""
        count = len(self.input_names)
        return tuple(sorted({
            slot.index for stage in self.stages if not stage.is_model for slot in stage.inputs if slot.index < count
        }))

    def unsendable(self, position: int, problem: object) -> str:
        """The error for output ``position`` when its value cannot be sent:
        ``{method} output cannot be sent: {problem}``, led by ``{tag} Failed: `` when a
        Python stage returned the value (MindSpore Serving fails that stage, whose
        results must be tensors)."""
        text = f"{self.name} output cannot be sent: {problem}"
        slot = self.output_slots[position]
        for stage in reversed(self.stages):
            if any(out.index == slot.index for out in stage.outputs):
                return text if stage.is_model else f"{stage.tag} Failed: {text}"
        return text


@dataclass
class ServableDefinition:
    """Everything servable_config.py declared: models and methods."""

    name: str
    models: list[Model] = field(default_factory=list)
    methods: dict[str, MethodDef] = field(default_factory=dict)
    # What the methods wired, checked alike across methods as MindSpore does: a Python
    # function's (inputs, outputs, takes a batch), a model's (inputs, outputs).
    stage_functions: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    model_io: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class MethodTrace:
    """The method whose body is running: its stages so far, the next free slot, and
    the deprecated ``call_*`` calls' rules (`LegacyCalls`)."""

    name: str
    stages: list[StageDef]
    next_slot: int
    legacy: LegacyCalls


# The definition being filled while servable_config.py runs, and the method being
# traced while its body runs. Loads are serialized by the loader's lock.
_defining: ServableDefinition | None = None
_tracing: MethodTrace | None = None
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
    options: dict[str, Any] | AclOptions | GpuOptions | None = None,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
    context: Context | dict[str, Any] | None = None,
    config_file: str | None = None,
) -> Model:
    """Declare a model whose file(s) live in every version folder; MindSpore
    Serving's signature, parameter order and checks.

    ``with_batch_dim=True``: the model's first dimension is the batch; instances
    are stacked into it. ``options``: the model's settings for its backend (mserve: a
    dict, e.g. ``jax_function``'s ``function`` and ``input_specs``, or batching), or
    MindSpore's deprecated ``AclOptions``/``GpuOptions`` (taken as ``context`` when
    no context is given). ``without_batch_dim_inputs``: indices of inputs that carry
    no batch dimension (taken from the first instance). ``context`` (a `Context`, or
    a dict) and ``config_file`` (a path relative to servable_config.py's folder, or
    absolute) go to the model's backend, which refuses what it cannot apply.
    A model file may be declared once per servable.
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
    if isinstance(context, Context):
        context = context.as_dict()
    elif context is not None and not isinstance(context, dict):
        raise ServableLoadError(f"Parameter 'context' should be Context, but gotten {type(context)}")
    if isinstance(options, DEPRECATED_OPTIONS):
        log.warning("'options' will be deprecated in the future, we recommend using 'context', if these two "
                    "parameters are both set, options will be ignored")
        context = context if context is not None else options.context.as_dict()
        options = None
    elif options is not None and not isinstance(options, dict):
        raise ServableLoadError(
            f"Parameter 'options' should be None, GpuOptions or AclOptions (or, in mserve, a dict of the backend's "
            f"options), but gotten {type(options)}")
    if config_file is not None and (not isinstance(config_file, str) or not config_file):
        raise ServableLoadError(f"Parameter 'config_file' should be a non-empty str, but actually {config_file!r}")
    used = {name for declared in definition.models for name in declared.model_files}
    for name in files:
        if name in used:
            raise ServableLoadError(f"Declare model {list(files)} failed, model file '{name}' has already been used")
    model = Model(
        list(files), model_format, with_batch_dim, no_batch, dict(options or {}), len(definition.models),
        context, config_file,
    )
    definition.models.append(model)
    return model


def declare_servable(
    servable_file: str | Sequence[str],
    model_format: str,
    with_batch_dim: bool = True,
    options: dict[str, Any] | AclOptions | GpuOptions | None = None,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
) -> Model:
    """Deprecated (MindSpore Serving 1.5): `declare_model` under its old name."""
    _deprecated("declare_servable", "declare_model")
    return declare_model(servable_file, model_format, with_batch_dim, options, without_batch_dim_inputs)


def _deprecated(name: str, substitute: str) -> None:
    log.warning(f"'{name}' is deprecated from MindSpore Serving 1.5.0 and will be removed in a future version, "
                f"use 'mserve.server.register.{substitute}' instead.")


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
    method's input names and ``output_names`` its outputs, in order. The body runs
    once, now, to record its stages (`add_stage`, or the deprecated ``call_*``)."""
    names = list(_str_tuple("output_names", output_names))

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        global _tracing
        definition = _definition("register_method")
        params = list(inspect.signature(fn).parameters.values())
        kinds = {inspect.Parameter.VAR_POSITIONAL: "VAR_POSITIONAL", inspect.Parameter.VAR_KEYWORD: "VAR_KEYWORD",
                 inspect.Parameter.KEYWORD_ONLY: "KEYWORD_ONLY"}
        for p in params:
            if p.kind in kinds:
                raise ServableLoadError(f"'{fn.__name__}' input {p.name} cannot be {kinds[p.kind]} !")
        legacy = LegacyCalls(fn)
        inputs = [Slot(i, f"input '{p.name}'") for i, p in enumerate(params)]
        _tracing = MethodTrace(fn.__name__, [], len(inputs), legacy)
        try:
            result = fn(*inputs)
            trace = _tracing
        finally:
            _tracing = None
        legacy.check_stage_count(len(trace.stages))
        returned = list(result) if isinstance(result, (tuple, list)) else [result]
        if not all(isinstance(r, Slot) for r in returned):
            raise ServableLoadError(
                "Each value returned is a placeholder for data and must come from the method inputs or the outputs "
                f"of add_stage (method {fn.__name__} returned {result!r})"
            )
        if len(returned) != len(names):
            raise ServableLoadError(
                f"Method return output size {len(returned)} not match registered {len(names)} (method "
                f"{fn.__name__}, output_names {names})"
            )
        if fn.__name__ in definition.methods:
            raise ServableLoadError(f"Method {fn.__name__} has been registered more than once.")
        definition.methods[fn.__name__] = MethodDef(
            fn.__name__, [p.name for p in params], names, trace.stages, returned, trace.next_slot
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
    ``tag`` names the stage in errors: ``tag="Preprocess"`` -> ``Preprocess Failed: ...``
    (untagged: ``Call Function 'servable.function' Failed: ...``, as in MindSpore).
    A function or model used by several stages must be wired alike each time.
    """
    return _add_stage(stage, args, outputs_count, batch_size, tag, check_batched=True)


def _add_stage(
    stage: Callable[..., Any] | Model,
    args: tuple,
    outputs_count: int,
    batch_size: int | None,
    tag: str | None,
    check_batched: bool,
) -> Any:
    """`add_stage`; ``check_batched=False`` leaves a batched function's parameters
    unchecked, as MindSpore's deprecated ``call_*_pipeline`` does."""
    trace = _tracing
    if trace is None:
        raise RuntimeError("register.add_stage must be called inside a function decorated with register_method")
    definition = _definition("add_stage")
    if tag is not None and not isinstance(tag, str):
        raise ServableLoadError(f"Parameter 'tag' should be str, but actually {type(tag)}")
    for i, arg in enumerate(args):
        if not isinstance(arg, Slot):
            raise ServableLoadError(
                "Each value of parameter *args is a placeholder for data and must come from the method inputs or the "
                f"outputs of add_stage (method '{trace.name}': argument {i} is {arg!r})"
            )
    if isinstance(outputs_count, bool) or not isinstance(outputs_count, int):
        raise ServableLoadError(f"Parameter 'outputs_count' should be int, but actually {type(outputs_count)}")
    if outputs_count < 1:
        raise ServableLoadError(f"Parameter 'outputs_count' should be >= 1, but actually {outputs_count}")
    if isinstance(stage, Model):
        if stage not in definition.models:
            raise ServableLoadError(
                f"Check failed in method '{trace.name}', the parameter 'stage' of add_stage must be function or Model "
                f"returned by declare_model, and ensure that interface 'declare_model' can take effect when importing "
                f"servable_config.py by the serving server")
        _wire_model(definition, stage, len(args), outputs_count)
        label = tag or f"model {stage.model_files[0]}"
    elif inspect.isfunction(stage) or (callable(stage) and not isinstance(stage, (str, type))):
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int):
                raise ServableLoadError(f"Parameter 'batch_size' should be int, but actually {type(batch_size)}")
            if batch_size < 0:
                raise ServableLoadError(f"Parameter 'batch_size' should be >= 0, but actually {batch_size}")
        label = tag or getattr(stage, "__name__", "stage")
        _wire_function(definition, trace.name, stage, len(args), outputs_count, batch_size is not None, check_batched)
    else:
        raise ServableLoadError(
            f"Check failed in method '{trace.name}', the parameter 'stage' of add_stage must be function or Model "
            f"returned by declare_model, now is {type(stage)}")
    outputs = [Slot(trace.next_slot + i, f"output {i} of {label}") for i in range(outputs_count)]
    trace.stages.append(StageDef(stage, list(args), outputs, batch_size, tag or _default_tag(definition, stage)))
    trace.next_slot += outputs_count
    return outputs[0] if outputs_count == 1 else tuple(outputs)


def _wire_model(definition: ServableDefinition, model: Model, inputs: int, outputs: int) -> None:
    """A model is wired with the same counts wherever it is used (MindSpore's check)."""
    known = definition.model_io.setdefault(model.index, (inputs, outputs))
    if known[0] != inputs:
        raise ServableLoadError(f"RegisterInputOutputInfo failed, inputs count {inputs} not match old count "
                                f"{known[0]}, model: {model.model_key}")
    if known[1] != outputs:
        raise ServableLoadError(f"RegisterInputOutputInfo failed, outputs count {outputs} not match old count "
                                f"{known[1]}, model: {model.model_key}")


def _wire_function(
    definition: ServableDefinition, method: str, fn: Callable[..., Any], inputs: int, outputs: int, batched: bool,
    check_batched: bool = True,
) -> None:
    """A Python stage takes its inputs (one per wired value, or one list when batched)
    and is wired alike wherever it is used (MindSpore's checks and texts)."""
    name = f"{definition.name}.{getattr(fn, '__name__', repr(fn))}"
    known = definition.stage_functions.get(name)
    if known is not None:
        if known[0] != inputs:
            raise ServableLoadError(f"Stage function '{name}' inputs count {inputs} not match last registered count "
                                    f"{known[0]}, method name '{method}'")
        if known[1] != outputs:
            raise ServableLoadError(f"Stage function '{name}' outputs count {outputs} not match last registered "
                                    f"count {known[1]}, method name '{method}'")
        if known[2] != batched:
            raise ServableLoadError(f"Failed to add stage function {name}: parameter 'batch_size' in multiple "
                                    f"'add_stage' should be enabled or disabled consistently")
    if check_batched or not batched:
        _check_function_arity(fn, inputs, batched)
    definition.stage_functions[name] = (inputs, outputs, batched)


def _default_tag(definition: ServableDefinition, stage: Callable[..., Any] | Model) -> str:
    """How a stage without a tag is named in its errors, as MindSpore names it:
    ``Call Function 'servable.function' Failed: ...``."""
    if isinstance(stage, Model):
        return "Model"
    return f"Call Function '{definition.name}.{getattr(stage, '__name__', 'stage')}'"


def _check_function_arity(fn: Callable[..., Any], count: int, batched: bool) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked when called
    try:
        sig.bind(*range(1 if batched else count))
    except TypeError:
        if batched:
            raise ServableLoadError(
                f"function {getattr(fn, '__name__', fn)} takes {sig}, but with batch_size set it is called with one "
                f"argument, the list of instances") from None
        raise ServableLoadError(
            f"function {getattr(fn, '__name__', fn)} input args count {len(sig.parameters)} not match the count "
            f"{count} registered in method") from None


# MindSpore Serving's deprecated method API (1.5): one preprocess, the model, one
# postprocess, each at most once and in that order; their output counts come from
# the assignments in the method's source (see mserve.serving.legacy_calls).

def call_preprocess(preprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated: ``add_stage(preprocess_fun, *args, outputs_count=N, tag="Preprocess")``."""
    _deprecated("call_preprocess", "add_stage")
    count = _legacy().before_preprocess("call_preprocess")
    return add_stage(preprocess_fun, *args, outputs_count=count, tag="Preprocess")


def call_preprocess_pipeline(preprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated: `call_preprocess` for a function that takes a list of instances."""
    _deprecated("call_preprocess_pipeline", "add_stage")
    count = _legacy().before_preprocess("call_preprocess_pipeline")
    return _add_stage(preprocess_fun, args, count, 0, "Preprocess", check_batched=False)


def call_servable(*args: Any) -> Any:
    """Deprecated: ``add_stage(model, *args, outputs_count=N)`` with the one declared model."""
    _deprecated("call_servable", "add_stage")
    legacy = _legacy()
    count = legacy.before_servable()
    models = _definition("call_servable").models
    if not models:
        raise ServableLoadError("There is no model declared, you can use declare_model to declare models.")
    if len(models) > 1:
        raise ServableLoadError("There are more than one servable declared when the interface 'call_servable' is "
                                "used, use 'add_stage' to replace 'call_servable'")
    return add_stage(models[0], *args, outputs_count=count)


def call_postprocess(postprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated: ``add_stage(postprocess_fun, *args, outputs_count=N, tag="Postprocess")``."""
    _deprecated("call_postprocess", "add_stage")
    count = _legacy().before_postprocess("call_postprocess")
    return add_stage(postprocess_fun, *args, outputs_count=count, tag="Postprocess")


def call_postprocess_pipeline(postprocess_fun: Callable[..., Any], *args: Any) -> Any:
    """Deprecated: `call_postprocess` for a function that takes a list of instances."""
    _deprecated("call_postprocess_pipeline", "add_stage")
    count = _legacy().before_postprocess("call_postprocess_pipeline")
    return _add_stage(postprocess_fun, args, count, 0, "Postprocess", check_batched=False)


def _legacy() -> LegacyCalls:
    if _tracing is None:
        raise RuntimeError("register.call_* must be called inside a function decorated with register_method")
    return _tracing.legacy


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


# MindSpore's ``register.model`` submodule: configs reach `Model` and friends through it.
model = types.ModuleType(f"{__name__}.model", "MindSpore Serving's register.model: declared models and contexts.")
model.__dict__.update(
    Model=Model, declare_model=declare_model, declare_servable=declare_servable, Context=Context,
    CPUDeviceInfo=CPUDeviceInfo, GPUDeviceInfo=GPUDeviceInfo, AscendDeviceInfo=AscendDeviceInfo,
    AclOptions=AclOptions, GpuOptions=GpuOptions,
)
sys.modules[model.__name__] = model
