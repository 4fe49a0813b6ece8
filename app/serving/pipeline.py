"""Running a method: its stages, in order, over a request's instances.

Each instance carries a row of slots (method inputs, then each stage's outputs). A
stage runs over the instances still alive; one that fails turns into that instance's
``error_msg`` and the instance skips the remaining stages. Python stages run per
instance or, with ``batch_size``, over lists of instances; model stages hand all live
rows to their version's model runner (a cross-request batcher or the `ModelStage`
itself). Between stages, instances past the request's deadline fail with ``Time out``.

A Python stage that raises never takes the request (or the server) down with it,
whatever it raises, ``SystemExit`` and ``KeyboardInterrupt`` included. The server
log gets a line with the traceback and the request id; the client gets MindSpore
Serving's ``{tag} Failed: ...``, and never a traceback or a file path:

* 500, ``{tag} Failed: internal error in the stage (ExcType), see the server log,
  request id ...``, when the exception cannot come from this instance's data: it is
  not an `Exception` (``SystemExit``, ``KeyboardInterrupt``), or it says the code or
  its environment is broken (`_SERVER_FAULTS`: ``NameError``, ``ImportError``,
  ``SyntaxError``, ``NotImplementedError``, ``OSError`` such as a missing file,
  ``MemoryError``, ``RecursionError``). Logged at ERROR.
* 400 for any other exception (``ValueError``, ``TypeError``, ``KeyError``,
  ``AttributeError``, ...): a stage refusing its input on purpose raises these, and
  so does a stage that meets input it did not expect (``float("abc")``,
  ``"abc".astype``). The client reads the exception's first line, with file paths
  replaced by ``<path>``, as MindSpore Serving shows it. Logged at INFO.
* A stage that raises `mserve.errors.InstanceError` chooses its message and status.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from typing import Any, Sequence

import numpy as np

from .model_stage import InstanceError, for_method
from ..register import MethodDef, Model, StageDef, current_version
from .servable import LoadedVersion, ModelCallError
from ..ops.access_log import current_request_id

log = logging.getLogger("mserve.serving.pipeline")


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
            for index in method.function_inputs:
                # A Python stage gets its inputs writable, as in MindSpore Serving: a stage
                # may change an input array in place, and later stages see the change.
                value = row[index]
                if isinstance(value, np.ndarray) and not value.flags.writeable:
                    row[index] = value.copy()
            slots.append(row)
            errors.append(None)

    # Tell the batchers ahead how many rows are coming, so they wait for them (and
    # only for them); whatever never arrives is counted off in the finally.
    alive_count = errors.count(None)
    announced = {}
    if version.batchers and alive_count:  # a version without batchers skips the walk
        for position, stage in enumerate(method.stages):
            batcher = version.batchers.get(stage.target.index) if stage.is_model else None  # type: ignore[union-attr]
            if batcher is not None:
                batcher.expect(alive_count)
                announced[position] = batcher
    token = current_version.set(_StageContext(version, deadline))
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
                    errors[i] = for_method(result, method, stage) if stage.is_model else result
                else:
                    row = slots[i]
                    for slot, value in zip(stage.outputs, result):
                        row[slot.index] = value  # type: ignore[index]
    finally:
        current_version.reset(token)
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
    """A stage's return value as a tuple of ``outputs_count`` values, as MindSpore
    Serving reads it: a tuple or list is the outputs (so ``return (y,)`` is one
    output ``y``), anything else is the one output; MindSpore Tensors (anything with
    ``asnumpy()``) become numpy arrays. A tuple or list of another length fails the
    instance, ``outputs_count=1`` included (return an array, or ``(values,)``, for one
    output made of several values)."""
    count = len(stage.outputs)
    if isinstance(value, (tuple, list)):
        if len(value) != count:
            name = getattr(stage.target, "__name__", stage.tag)
            raise InstanceError(
                f"{stage.tag} Failed: The outputs number {len(value)} of one instance returned by function '{name}' "
                f"is not equal to the outputs number {count} registered in method"
            )
        return tuple(_plain(v) for v in value)
    if count != 1:
        name = getattr(stage.target, "__name__", stage.tag)
        raise InstanceError(
            f"{stage.tag} Failed: The outputs number 1 of one instance returned by function '{name}' is not equal to "
            f"the outputs number {count} registered in method"
        )
    return (_plain(value),)


def _plain(value: Any) -> Any:
    """A MindSpore Tensor (or anything else with ``asnumpy()``) as a numpy array."""
    if not isinstance(value, np.ndarray) and callable(getattr(value, "asnumpy", None)):
        return value.asnumpy()
    return value


def _call_function(stage: StageDef, row: tuple) -> tuple | InstanceError:
    try:
        return _outputs(stage, stage.target(*row))  # type: ignore[operator]
    except InstanceError as exc:
        return exc
    except BaseException as exc:  # noqa: BLE001 - the user's stage failed for this instance
        return stage_failure(stage, exc)


def _call_batched_function(stage: StageDef, rows: list[tuple]) -> list[tuple | InstanceError]:
    """A Python stage with ``batch_size``, read as MindSpore Serving reads it: the
    function gets a list of instances and returns (or yields) one result per
    instance. A result that raises fails that instance only; results missing at the
    end fail the instances left; results beyond the instances given are ignored."""
    step = stage.batch_size or len(rows)
    results: list[tuple | InstanceError] = []
    name = getattr(stage.target, "__name__", stage.tag)
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        try:
            values = iter(stage.target(list(chunk)))  # type: ignore[operator]
        except InstanceError as exc:
            results.extend([exc] * len(chunk))
            continue
        except BaseException as exc:  # noqa: BLE001 - the user's stage failed for this chunk
            results.extend([stage_failure(stage, exc)] * len(chunk))
            continue
        for done in range(len(chunk)):
            try:
                results.append(_outputs(stage, next(values)))
            except StopIteration:
                missing = InstanceError(
                    f"{stage.tag} Failed: The number {done} of instances returned by function '{name}' is not equal "
                    f"to the number {len(chunk)} of instances provided to this function."
                )
                results.extend([missing] * (len(chunk) - done))
                break
            except InstanceError as exc:
                results.append(exc)
            except BaseException as exc:  # noqa: BLE001 - the user's stage failed for this instance
                results.append(stage_failure(stage, exc))
    return results


# An absolute path, POSIX or Windows, as exception texts quote them.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.~+-]+){2,}[\\/]?")
_MAX_MESSAGE = 512


# Exceptions that say the stage's code or environment is broken, whatever the input.
_SERVER_FAULTS = (NameError, ImportError, SyntaxError, NotImplementedError, OSError, MemoryError, RecursionError)


def stage_failure(stage: StageDef, exc: BaseException) -> InstanceError:
    """The error a client sees when a Python stage raised ``exc`` (see the module
    doc for the 400/500 split), logged with its traceback and the request id."""
    if isinstance(exc, ModelCallError):
        return InstanceError(f"{stage.tag} Failed: {exc.message}", status=exc.status)
    rid = current_request_id.get() or "-"
    if isinstance(exc, Exception) and not isinstance(exc, _SERVER_FAULTS):
        log.info("stage %s refused an instance: %s (request id %s)", stage.tag, type(exc).__name__, rid,
                 exc_info=exc)
        return InstanceError(f"{stage.tag} Failed: {client_text(exc)}")
    log.error("stage %s raised %s (request id %s)", stage.tag, type(exc).__name__, rid, exc_info=exc)
    return InstanceError(
        f"{stage.tag} Failed: internal error in the stage ({type(exc).__name__}), "
        f"see the server log, request id {rid}",
        status=500,
    )


def client_text(exc: BaseException) -> str:
    """An exception's message as a client may read it: its first line, file paths
    replaced, bounded in length."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _PATH.sub("<path>", text)
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."
