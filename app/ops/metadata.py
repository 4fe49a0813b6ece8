"""Describing loaded servables: versions, methods, inputs and outputs.

One description, used by the CLI (start table, ``mserve list``) and the metadata
endpoints. A method input's dtype and shape are known when it feeds a model stage
directly; outputs likewise when they come straight from a model.
"""

from __future__ import annotations

from typing import Any

from ..register import MethodDef, Slot
from .metrics import placement
from ..serving.servable import LoadedVersion, Servable


def _spec(dtype: str | None, shape: list[int | None] | None) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape}


def describe_method(version: LoadedVersion, method: MethodDef) -> dict[str, Any]:
    inputs: dict[int, dict[str, Any]] = {}
    produced: dict[int, dict[str, Any]] = {}
    for stage in method.stages:
        if not stage.is_model:
            continue
        ms = version.model_stage(stage.target)  # type: ignore[arg-type]
        for i, slot in enumerate(stage.inputs):
            if slot.index < len(method.input_names) and slot.index not in inputs:
                shape = ms.instance_shape(i)
                inputs[slot.index] = _spec(ms.inputs[i].dtype.name, None if shape is None else list(shape))
        for i, slot in enumerate(stage.outputs):
            spec = ms.outputs[i]
            shape = spec.shape
            if shape is not None and ms.model.with_batch_dim:
                shape = shape[1:]
            produced[slot.index] = _spec(spec.dtype.name, None if shape is None else list(shape))

    def out_spec(slot: Slot) -> dict[str, Any]:
        if slot.index < len(method.input_names):
            return inputs.get(slot.index, _spec(None, None))
        return produced.get(slot.index, _spec(None, None))

    return {
        "name": method.name,
        "inputs": [{"name": n, **inputs.get(i, _spec(None, None))} for i, n in enumerate(method.input_names)],
        "outputs": [{"name": n, **out_spec(s)} for n, s in zip(method.output_names, method.output_slots)],
    }


def _devices(runtime: Any) -> list[Any]:
    """The devices one model instance runs on (a sharded one: several)."""
    return list(getattr(runtime, "devices", None) or [getattr(runtime, "device", "?")])


def model_instances(stage: Any) -> list[list[str]]:
    """Per model instance, its devices (a stage whose model runs in device processes
    says it itself)."""
    remote = getattr(stage, "instances", None)
    if remote is not None:
        return remote
    return [[str(d) for d in _devices(r)] for r in stage.runtimes]


def describe_version(version: LoadedVersion) -> dict[str, Any]:
    return {
        "version": version.version,
        "methods": [describe_method(version, m) for m in version.methods.values()],
        "models": [
            {
                "files": stage.model.model_files,
                "format": stage.model.model_format,
                "with_batch_dim": stage.model.with_batch_dim,
                "max_batch_size": stage.max_batch_size,
                "backend": version.backends.get(index, ("?", "?"))[0],
                "device_type": version.backends.get(index, ("?", "?"))[1],
                "devices": sum(len(i) for i in model_instances(stage)),
                "instances": model_instances(stage),
                # Which process holds the model on which device: the device processes
                # (and front-end copies), or this process when everything runs in one.
                "placement": placement(stage),
                "inputs": [s.describe() for s in stage.inputs],
                "outputs": [s.describe() for s in stage.outputs],
            }
            for index, stage in version.stages.items()
        ],
    }


def describe_servable(servable: Servable) -> dict[str, Any]:
    return {
        "name": servable.name,
        "latest_version": servable.latest,
        "versions": [describe_version(servable.versions[v]) for v in sorted(servable.versions)],
    }
