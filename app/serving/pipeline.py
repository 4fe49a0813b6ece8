"""Running a method: its stages, in order, over a request's instances.

Each instance carries a row of slots (method inputs, then each stage's outputs). A
stage runs over the instances still alive; one that fails turns into that instance's
``error_msg`` and the instance skips the remaining stages. Python stages run per
instance or, with ``batch_size``, over lists of instances; model stages hand all live
rows to their version's model runner (a cross-request batcher or the `ModelStage`
itself). Between stages, instances past the request's deadline fail with ``Time out``.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Sequence

from .model_stage import InstanceError
from ..register import MethodDef, Model, StageDef, _current_version
from .servable import LoadedVersion


class _StageContext:
    """What `Model.call` inside a Python stage runs against: this request's version
    and deadline."""

    __slots__ = ("version", "deadline")

    def __init__(self, version: LoadedVersion, deadline: float):
        self.version = version
        self.deadline = deadline

    def call_model(self, model: Model, args: tuple, subgraph: int = 0) -> Any:
        return self.version.call_model(model, args, self.deadline, subgraph)


def run_method(
    version: LoadedVersion,
    method: MethodDef,
    inputs: Sequence[Sequence[Any] | InstanceError],
    deadline: float = float("inf"),
) -> list[list[Any] | InstanceError]:
    """Run ``method`` on decoded instances (each a list of input values, or an error
    from decoding) before ``deadline`` (``time.monotonic()`` seconds). Returns per
    instance its output values or an `InstanceError`."""
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

    # Tell the batchers ahead how many rows are coming, so they wait for them (and
    # only for them); whatever never arrives is counted off in the finally.
    alive_count = sum(e is None for e in errors)
    announced = {}
    for position, stage in enumerate(method.stages):
        batcher = version.batchers.get(stage.target.index) if stage.is_model else None  # type: ignore[union-attr]
        if batcher is not None and alive_count:
            batcher.expect(alive_count)
            announced[position] = batcher
    token = _current_version.set(_StageContext(version, deadline))
    try:
        for position, stage in enumerate(method.stages):
            if time.monotonic() >= deadline:
                errors = [e or InstanceError("Time out", status=504) for e in errors]
                break
            alive = [i for i, e in enumerate(errors) if e is None]
            if not alive:
                break
            rows = [tuple(slots[i][s.index] for s in stage.inputs) for i in alive]  # type: ignore[index]
            if stage.is_model:
                count = alive_count if announced.pop(position, None) is not None else 0
                results = version.run_model(stage.target, rows, deadline, count)  # type: ignore[arg-type]
            elif stage.batch_size is None:
                results = _map_function(version, stage, rows)
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
        for batcher in announced.values():
            batcher.arrive(alive_count)

    return [
        errors[i] if errors[i] is not None else [slots[i][s.index] for s in method.output_slots]  # type: ignore[index]
        for i in range(len(slots))
    ]


def _map_function(version: LoadedVersion, stage: StageDef, rows: list[tuple]) -> list[tuple | InstanceError]:
    """A per-instance Python stage over rows; in the servable's worker pool when it
    has one (decoders such as Pillow release the GIL, so a many-instance request
    preprocesses in parallel)."""
    pool = version.stage_pool
    if pool is None or len(rows) < 2:
        return [_call_function(stage, row) for row in rows]
    # Each task gets a copy of this context, so Model.call works in pool threads.
    futures = [pool.submit(contextvars.copy_context().run, _call_function, stage, row) for row in rows]
    return [f.result() for f in futures]


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
