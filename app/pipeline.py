"""Running a method: its stages, in order, over a request's instances.

Each instance carries a row of slots (method inputs, then each stage's outputs). A
stage runs over the instances still alive; one that fails turns into that instance's
``error_msg`` and the instance skips the remaining stages. Python stages run per
instance or, with ``batch_size``, over lists of instances; model stages hand all live
rows to their `ModelStage` (or to a batcher in front of it), which batches them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .model_stage import InstanceError
from .register import MethodDef, StageDef, _current_version
from .servable import LoadedVersion

# How a model stage's rows are executed: the stage itself by default, or a
# cross-request batcher installed by the server.
ModelRunner = Callable[[LoadedVersion, StageDef, list[tuple]], list[Any]]


def direct_model_runner(version: LoadedVersion, stage: StageDef, rows: list[tuple]) -> list[Any]:
    return version.model_stage(stage.target).run(rows)  # type: ignore[arg-type]


def run_method(
    version: LoadedVersion,
    method: MethodDef,
    inputs: Sequence[Sequence[Any] | InstanceError],
    model_runner: ModelRunner = direct_model_runner,
) -> list[list[Any] | InstanceError]:
    """Run ``method`` on decoded instances (each a list of input values, or an error
    from decoding). Returns per instance its output values or an `InstanceError`."""
    slots: list[list[Any] | None] = []
    errors: list[InstanceError | None] = []
    for item in inputs:
        if isinstance(item, InstanceError):
            slots.append(None)
            errors.append(item)
        else:
            row = [None] * method.slot_count
            row[: len(item)] = item
            slots.append(row)
            errors.append(None)

    token = _current_version.set(version)
    try:
        for stage in method.stages:
            alive = [i for i, e in enumerate(errors) if e is None]
            if not alive:
                break
            rows = [tuple(slots[i][s.index] for s in stage.inputs) for i in alive]  # type: ignore[index]
            if stage.is_model:
                results = model_runner(version, stage, rows)
            elif stage.batch_size is None:
                results = [_call_function(stage, row) for row in rows]
            else:
                results = _call_batched_function(stage, rows)
            for i, result in zip(alive, results):
                if isinstance(result, InstanceError):
                    errors[i] = result
                else:
                    row = slots[i]
                    for slot, value in zip(stage.outputs, result):
                        row[slot.index] = value  # type: ignore[index]
    finally:
        _current_version.reset(token)

    return [
        errors[i] if errors[i] is not None else [slots[i][s.index] for s in method.output_slots]  # type: ignore[index]
        for i in range(len(slots))
    ]


def _outputs(stage: StageDef, value: Any) -> tuple:
    """A stage's return value as a tuple of ``outputs_count`` values."""
    count = len(stage.outputs)
    if count == 1:
        return (value,)
    if not isinstance(value, (tuple, list)) or len(value) != count:
        got = len(value) if isinstance(value, (tuple, list)) else 1
        raise InstanceError(f"{stage.tag} Failed: the stage returned {got} outputs, outputs_count is {count}")
    return tuple(value)


def _call_function(stage: StageDef, row: tuple) -> tuple | InstanceError:
    try:
        return _outputs(stage, stage.target(*row))  # type: ignore[operator]
    except InstanceError as exc:
        return exc
    except Exception as exc:  # the user's stage failed for this instance
        return InstanceError(f"{stage.tag} Failed: {_describe(exc)}")


def _call_batched_function(stage: StageDef, rows: list[tuple]) -> list[tuple | InstanceError]:
    step = stage.batch_size or len(rows)
    results: list[tuple | InstanceError] = []
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        try:
            values = list(stage.target(list(chunk)))  # type: ignore[operator]
            if len(values) != len(chunk):
                raise InstanceError(
                    f"{stage.tag} Failed: the stage got {len(chunk)} instances but returned {len(values)} results"
                )
            results.extend(_outputs_or_error(stage, v) for v in values)
        except InstanceError as exc:
            results.extend([exc] * len(chunk))
        except Exception as exc:
            results.extend([InstanceError(f"{stage.tag} Failed: {_describe(exc)}")] * len(chunk))
    return results


def _outputs_or_error(stage: StageDef, value: Any) -> tuple | InstanceError:
    try:
        return _outputs(stage, value)
    except InstanceError as exc:
        return exc


def _describe(exc: Exception) -> str:
    text = str(exc)
    return text if text else type(exc).__name__
