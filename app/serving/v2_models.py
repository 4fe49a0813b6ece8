"""Servable methods as Open Inference Protocol models, and OIP inference on the dataplane.

Naming: each method of a servable is the OIP model ``{servable}.{method}``
(``add.add_common``); a servable with exactly one method is also the model
``{servable}``. MindSpore version numbers are OIP version strings (``"1"``); no
version means the newest loaded one.

Tensors and instances: MindSpore's protocol sends a list of instances; OIP sends one
tensor per input. A method whose model stages all have a batch dimension
(``with_batch_dim=True``) is *batched*: every input tensor's first dimension counts
instances (metadata shows it as -1), instance ``i`` gets element ``i`` of each input,
and each output stacks the instances' values. Any other method takes one instance per
request: the tensors are the instance's values as they are (a one-element BYTES tensor
is its str or bytes value).

`V2Inference` runs an OIP infer through a `Dataplane`: the MindSpore routes'
admission, limits, deadline, pipeline and error mapping. An instance that fails fails
the request (OIP has no per-instance errors), with that instance's message and status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import BadRequest, InstanceError, NotFound
from ..ops.metadata import describe_method
from ..protocol import v2_tensors
from ..protocol.urls import PredictTarget
from ..register import MethodDef
from .dataplane import Dataplane, Outcome
from .servable import LoadedVersion, Servable, ServableRegistry

PLATFORM = "mserve"
UNKNOWN_DATATYPE = "UNKNOWN"  # metadata of an input a Python stage takes first: any datatype


def parse_version(text: str | None) -> int:
    """An OIP version string as a MindSpore version number (0: the newest)."""
    if not text:
        return 0
    if not text.isdigit() or not text.isascii() or len(text) > 10:
        raise NotFound(f"model version {text!r} is not served: versions are whole numbers such as \"1\"")
    return int(text)


def resolve_name(registry: ServableRegistry, model: str) -> tuple[str, str]:
    """The (servable, method) an OIP model name stands for; `NotFound` names what is served."""
    servables = registry.servables()
    found = servables.get(model)
    if found is not None:
        methods = list(found.definition.methods)
        if len(methods) == 1:
            return model, methods[0]
        raise NotFound(
            f"model {model} is a servable with several methods: name one as {model}.{{method}} "
            f"({', '.join(f'{model}.{m}' for m in methods)})"
        )
    servable, dot, method = model.rpartition(".")
    if not dot or servable not in servables:
        raise NotFound(f"model {model} is not served{served_hint(registry)}")
    methods = servables[servable].definition.methods
    if method not in methods:
        served = ", ".join(f"{servable}.{m}" for m in methods)
        raise NotFound(f"model {model} is not served; servable {servable} is served as {served}")
    return servable, method


def served_hint(registry: ServableRegistry) -> str:
    names = model_names(registry)
    return f"; served: {', '.join(names[:20])}" if names else "; no servable is loaded"


def model_names(registry: ServableRegistry) -> list[str]:
    """Every OIP model name served, ``{servable}.{method}`` and single-method servables."""
    return [name for name, _ in models(registry)]


def models(registry: ServableRegistry) -> list[tuple[str, Servable]]:
    """Every OIP model name served, with its servable (one snapshot of the registry)."""
    entries = []
    for name, servable in sorted(registry.servables().items()):
        methods = list(servable.definition.methods)
        if len(methods) == 1:
            entries.append((name, servable))
        entries.extend((f"{name}.{m}", servable) for m in methods)
    return entries


def lookup(registry: ServableRegistry, model: str, version: str | None) -> tuple[LoadedVersion, MethodDef]:
    servable, method = resolve_name(registry, model)
    return registry.lookup(servable, parse_version(version), method)


def is_batched(version: LoadedVersion, method: MethodDef) -> bool:
    models = [stage.target for stage in method.stages if stage.is_model]
    return bool(models) and all(model.with_batch_dim for model in models)  # type: ignore[union-attr]


def metadata(registry: ServableRegistry, model: str, version: str | None) -> dict[str, Any]:
    """The OIP model metadata: versions, platform, inputs and outputs with datatypes and shapes."""
    loaded, method = lookup(registry, model, version)
    described = describe_method(loaded, method)
    batched = is_batched(loaded, method)
    servable = registry.servables()[loaded.name]

    def tensor(spec: dict[str, Any]) -> dict[str, Any]:
        dims = spec["shape"]
        shape = [-1] if dims is None else [-1 if d is None else d for d in dims]
        if batched and dims is not None:
            shape = [-1, *shape]
        datatype = UNKNOWN_DATATYPE
        if spec["dtype"] is not None:
            datatype = v2_tensors.datatype_of(np.dtype(spec["dtype"]))
        return {"name": spec["name"], "datatype": datatype, "shape": shape}

    return {
        "name": model,
        "versions": [str(v) for v in sorted(servable.versions)],
        "platform": PLATFORM,
        "inputs": [tensor(s) for s in described["inputs"]],
        "outputs": [tensor(s) for s in described["outputs"]],
    }


# --------------------------------------------------------------------------- instances


def split_instances(method: MethodDef, batched: bool, inputs: dict[str, np.ndarray]) -> list[list[Any]]:
    """The method's instances from the request's input tensors."""
    missing = [n for n in method.input_names if n not in inputs]
    if missing:
        raise BadRequest(
            f"missing input(s) {', '.join(missing)}: method {method.name} takes {', '.join(method.input_names)}"
        )
    extra = [n for n in inputs if n not in method.input_names]
    if extra:
        raise BadRequest(
            f"unexpected input(s) {', '.join(extra)}: method {method.name} takes {', '.join(method.input_names)}"
        )
    arrays = [inputs[n] for n in method.input_names]
    if not batched:
        return [[_value(a) for a in arrays]]
    counts = set()
    for name, array in zip(method.input_names, arrays):
        if array.ndim == 0:
            raise BadRequest(f"input {name}: a batched model's inputs need a first (batch) dimension, got shape []")
        counts.add(array.shape[0])
    if len(counts) > 1:
        shown = ", ".join(f"{n} {a.shape[0]}" for n, a in zip(method.input_names, arrays))
        raise BadRequest(f"the inputs' first (batch) dimensions differ: {shown}")
    count = counts.pop() if counts else 0
    if count == 0:
        raise BadRequest("the batch is empty: the inputs' first dimension is 0")
    return [[_value(a[i]) for a in arrays] for i in range(count)]


def _value(array: Any) -> Any:
    """What a stage gets: arrays as they are, a BYTES element as str, or bytes as a
    1-D uint8 array (as MindSpore's protocol hands bytes to stages)."""
    if isinstance(array, np.ndarray) and array.dtype == object:
        if array.size != 1:
            raise BadRequest(
                f"a BYTES input holds one str or bytes value per instance, got shape {list(array.shape)}"
            )
        array = array.reshape(-1)[0]
    if isinstance(array, bytes):
        return np.frombuffer(array, dtype=np.uint8)
    return array


def stack_outputs(method: MethodDef, batched: bool, results: Sequence[Any]) -> dict[str, np.ndarray]:
    """The output tensors from the instances' results; an `InstanceError` fails the request."""
    for result in results:
        if isinstance(result, InstanceError):
            raise result
    outputs = {}
    for index, name in enumerate(method.output_names):
        try:
            values = [v2_tensors.as_output(result[index]) for result in results]
            if not batched:
                array = values[0]
                outputs[name] = array.reshape(1) if array.dtype == object else array
            elif values[0].dtype == object:
                outputs[name] = np.concatenate([v.reshape(-1) for v in values])
            else:
                outputs[name] = np.stack(values)
        except (v2_tensors.OutputError, ValueError) as exc:
            raise InstanceError(f"{method.name} output {name} cannot be sent: {exc}", status=500) from None
    return outputs


# --------------------------------------------------------------------------- dataplane


@dataclass
class Inferred:
    """A finished infer: the version that ran it, and its output tensors."""

    version: int
    outputs: dict[str, np.ndarray]
    batched: bool


class V2Inference:
    """OIP infer over a `Dataplane` (shared with the MindSpore routes of the same transport)."""

    def __init__(self, dataplane: Dataplane):
        self.dataplane = dataplane

    @property
    def registry(self) -> ServableRegistry:
        return self.dataplane.registry

    def target(self, model: str, version: str | None) -> PredictTarget:
        servable, method = resolve_name(self.registry, model)
        return PredictTarget(servable, parse_version(version), method)

    def infer(self, model: str, version: str | None, inputs: dict[str, np.ndarray], where: str) -> Outcome[Inferred]:
        """Run one infer; never raises. ``inputs`` are the request's tensors by name."""

        ran: list[LoadedVersion] = []

        def decode(loaded: LoadedVersion, method: MethodDef) -> list[list[Any]]:
            ran.append(loaded)
            instances = split_instances(method, is_batched(loaded, method), inputs)
            self.dataplane.check_instance_count(len(instances))
            return instances

        def build(method: MethodDef, results: Sequence[Any]) -> tuple[int, Inferred]:
            batched = is_batched(ran[0], method)
            return 200, Inferred(ran[0].version, stack_outputs(method, batched, results), batched)

        return self.dataplane.predict(lambda: self.target(model, version), decode, build, where=where)
