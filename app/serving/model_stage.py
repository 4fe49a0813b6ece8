"""A model stage: checks each instance against the model, batches, calls the runtime.

Per-instance inputs are checked against the model's declared inputs as MindSpore
Serving checks them: the byte size of one instance first, then the exact dtype; an
instance of the right size and dtype but another shape (``(32, 32)`` for a model
input ``(1, 32, 32)``) is reshaped to the model's shape, as MindSpore feeds the bytes.
Inputs with free (symbolic) dimensions are checked by shape. One bad instance fails
alone; the message is MindSpore's, with dtypes, shapes and the method value that
feeds the input after it. Good rows are
then run in as few device calls as the model allows: stacked into the batch
dimension (``with_batch_dim=True``, padded up to a fixed batch size), or one call
per instance otherwise. `ModelStage.run` takes rows from any number of requests, so a
cross-request batcher can sit in front of it.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import InstanceError, ServingError
from ..register import Model


def _type_name(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return value.dtype.name
    if isinstance(value, str):
        return "str"
    return type(value).__name__


# MindSpore Serving's names for data types, in its error messages.
_MS_TYPES = {
    "bool": "kMSI_Bool", "int8": "kMSI_Int8", "uint8": "kMSI_Uint8", "int16": "kMSI_Int16", "uint16": "kMSI_Uint16",
    "int32": "kMSI_Int32", "uint32": "kMSI_Uint32", "int64": "kMSI_Int64", "uint64": "kMSI_Uint64",
    "float16": "kMSI_Float16", "float32": "kMSI_Float32", "float64": "kMSI_Float64", "str": "kMSI_String",
    "bytes": "kMSI_Bytes",
}


def ms_type_name(name: str) -> str:
    return _MS_TYPES.get(name, "kMSI_Unknown")


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def bucket_sizes(max_batch_size: int, configured: Sequence[int] | None = None) -> list[int]:
    """Batch sizes to compile: the configured list, or powers of two below the
    maximum, plus the maximum itself."""
    if configured:
        return sorted({int(s) for s in configured if 0 < int(s) <= max_batch_size} | {max_batch_size})
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


# `` (model input 0 is input 'x1', output 0 of f in method m: int32 given, float32 expected)``:
# the labels (no colon in them), then the detail of what was wrong (kept as it is).
_NAMED = re.compile(r" \(model input (\d+) is [^:]*?(: .*)?\)$", re.S)


def input_label(method: Any, stage: Any, index: int) -> str | None:
    """What feeds model input ``index`` of ``stage`` in ``method``: ``input 'x1'`` (a
    method input) or the slot's own label (``output 0 of add_trans_datatype``)."""
    if index >= len(stage.inputs):
        return None
    slot = stage.inputs[index]
    return f"input '{method.input_names[slot.index]}'" if slot.index < len(method.input_names) else slot.label


def for_method(error: InstanceError, method: Any, stage: Any) -> InstanceError:
    """``error`` from checking a model's inputs, naming only what ``method`` feeds
    the input (the check itself runs where rows of every method meet, a batcher or a
    device process, and names what every method feeds)."""
    found = _NAMED.search(str(error))
    if found is None:
        return error
    label = input_label(method, stage, int(found.group(1)))
    if label is None:
        return error
    detail = found.group(2) or ""
    message = str(error)[: found.start()] + f" (model input {found.group(1)} is {label}{detail})"
    cause = message if error.cause == str(error) else error.cause
    return InstanceError(message, status=error.status, cause=cause)


def model_failure(exc: Exception) -> InstanceError:
    """A runtime's failure as the instances' error: 500, or the status a runtime
    chose by raising a `ServingError` (a distributed group that lost a host: 503)."""
    if isinstance(exc, ServingError):
        return InstanceError(f"Model Failed: {exc.message}", status=exc.status)
    return InstanceError(f"Model Failed: {exc}", status=500)


class ModelStage:
    """One declared model, loaded on one or more devices."""

    remote = False  # True for a front-end's stand-in whose model runs in a device process

    def __init__(
        self,
        model: Model,
        runtimes: Sequence[Any],
        max_batch_size: int | None = None,
        buckets: Sequence[int] | None = None,
    ):
        if not runtimes:
            raise ValueError("a model stage needs at least one runtime")
        self.model = model
        self.runtimes = list(runtimes)
        first = self.runtimes[0]
        self.inputs: list[Any] = first.inputs
        self.outputs: list[Any] = first.outputs
        self.batched_inputs = [
            model.with_batch_dim and i not in model.without_batch_dim_inputs for i in range(len(self.inputs))
        ]
        self.fixed_batch = self._fixed_batch()
        # The largest batch one call carries (the artifact's own batch size when it
        # fixes one), and the sizes calls are padded to: each is compiled at warm-up,
        # so no batch size ever compiles on the request path.
        if self.fixed_batch:
            self.max_batch_size: int | None = self.fixed_batch
            self.buckets = [self.fixed_batch]
        elif model.with_batch_dim:
            self.max_batch_size = max_batch_size or 32
            self.buckets = bucket_sizes(self.max_batch_size, buckets)
        else:
            self.max_batch_size = None
            self.buckets = []
        self._next_runtime = itertools.cycle(range(len(self.runtimes)))
        self._rr_lock = threading.Lock()
        # What feeds each model input, for error messages: set by `name_inputs`.
        self.input_labels: list[str | None] = [None] * len(self.inputs)
        # Per input, what `check` compares against, worked out once (np.prod alone
        # cost ~9% of a small model's predict when done per call): the spec, the
        # instance shape, and its byte size when every dimension is known (else None).
        self._wants: list[tuple[Any, tuple[int | None, ...] | None, int | None]] = []
        for i, spec in enumerate(self.inputs):
            want = self.instance_shape(i)
            concrete = want is not None and all(d is not None for d in want)
            # math.prod: exact, where np.prod's int64 would wrap around on a huge shape.
            self._wants.append((spec, want, math.prod(want) * spec.dtype.itemsize if concrete else None))

    def name_inputs(self, methods: Sequence[Any]) -> None:
        """Learn from the methods' wiring what feeds each model input (``input 'x1'``,
        ``output 0 of add_trans_datatype``), so a dtype or shape error names it, not
        only its position. A model fed differently by several methods lists each here;
        `for_method` then keeps only what the failing request's method feeds."""
        for i in range(len(self.inputs)):
            fed: dict[str, list[str]] = {}
            for method in methods:
                for stage in method.stages:
                    if stage.target is not self.model:
                        continue
                    label = input_label(method, stage, i)
                    if label is not None:
                        fed.setdefault(label, []).append(method.name)
            if len(fed) == 1:
                self.input_labels[i] = next(iter(fed))
            elif fed:
                self.input_labels[i] = ", ".join(
                    f"{label} in method {'/'.join(names)}" for label, names in fed.items()
                )

    def _detail(self, index: int, what: str) -> str:
        """`` (model input 0 is input 'x1': int32 given, float32 expected)`` after
        MindSpore's text; the feeding value is named when known."""
        label = self.input_labels[index] if index < len(self.input_labels) else None
        return f" (model input {index} is {label}: {what})" if label else f" ({what})"

    def _fixed_batch(self) -> int | None:
        if not self.model.with_batch_dim:
            return None
        for spec, batched in zip(self.inputs, self.batched_inputs):
            if batched and spec.shape:
                if spec.shape[0] is None:
                    return None
                return spec.shape[0]
        return None

    # ----------------------------------------------------------------- checking

    def instance_shape(self, index: int) -> tuple[int | None, ...] | None:
        """The shape one instance must have for input ``index``."""
        spec = self.inputs[index]
        if spec.shape is None:
            return None
        if self.batched_inputs[index]:
            return tuple(spec.shape[1:])
        return tuple(spec.shape)

    def check(self, args: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """The row as arrays shaped as the model wants them, or `InstanceError`
        (MindSpore's wording, then what mserve knows) unless ``args`` fit the model.
        Numpy scalars (what arithmetic on 0-d arrays returns in a Python stage) count
        as 0-d arrays."""
        row = [np.asarray(v) if isinstance(v, np.generic) else v for v in args]
        for i, (value, (spec, want, want_bytes)) in enumerate(zip(row, self._wants)):
            if not isinstance(value, np.ndarray):
                raise self._dtype_error(i, _type_name(value), spec)
            if want_bytes is not None:
                if value.nbytes != want_bytes:
                    given = f"shape {_shape_text(value.shape)} {value.dtype.name} given"
                    expected = f"{_shape_text(want)} {spec.dtype.name} expected"
                    raise InstanceError(
                        f"Given model input {i} size {value.nbytes} not match the size {want_bytes} defined in model"
                        f"{self._detail(i, f'{given}, {expected}')}"
                    )
                if value.dtype != spec.dtype:
                    raise self._dtype_error(i, value.dtype.name, spec)
                if value.shape != want:
                    row[i] = value.reshape(want)  # MindSpore feeds the bytes in the model's shape
                continue
            if value.dtype != spec.dtype:
                raise self._dtype_error(i, value.dtype.name, spec)
            if want is not None and (
                len(want) != value.ndim or any(w is not None and w != g for w, g in zip(want, value.shape))
            ):
                shapes = f"shape {_shape_text(value.shape)} given, {_shape_text(want)} expected"
                raise InstanceError(
                    f"Given model input {i} size {value.nbytes} not match the size defined in model"
                    f"{self._detail(i, shapes)}"
                )
        return tuple(row)

    def _dtype_error(self, index: int, given: str, spec: Any) -> InstanceError:
        return InstanceError(
            f"Given model input {index} data type {ms_type_name(given)} not match the data type "
            f"{ms_type_name(spec.dtype.name)} defined in model"
            f"{self._detail(index, f'{given} given, {spec.dtype.name} expected')}"
        )

    def batch_key(self, row: Sequence[np.ndarray]) -> tuple:
        """Rows with equal keys can share a device call: same shapes, and the same
        values for inputs without a batch dimension (one value serves the batch)."""
        return tuple(
            a.shape if batched else (a.shape, a.dtype.str, a.tobytes())
            for a, batched in zip(row, self.batched_inputs)
        )

    # ----------------------------------------------------------------- running

    def _runtime(self) -> Any:
        if len(self.runtimes) == 1:
            return self.runtimes[0]
        with self._rr_lock:
            return self.runtimes[next(self._next_runtime)]

    def run(self, rows: Sequence[Sequence[Any]]) -> list[tuple | InstanceError]:
        """Run checked rows (one tuple of inputs per instance); a result or an
        `InstanceError` per row, in order."""
        checked: list[tuple | InstanceError] = []
        for args in rows:
            try:
                checked.append(self.check(args))
            except InstanceError as exc:
                checked.append(exc)
        if not self.model.with_batch_dim:  # one call per row
            return [row if isinstance(row, InstanceError) else self._call_one(row) for row in checked]
        results: list[tuple | InstanceError] = list(checked)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(checked):
            if not isinstance(row, InstanceError):
                groups.setdefault(self.batch_key(row), []).append(i)
        for members in groups.values():
            step = self.max_batch_size or len(members)
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                for i, out in zip(chunk, self.run_batch([checked[i] for i in chunk])):  # type: ignore[misc]
                    results[i] = out
        return results

    def _call_one(self, args: Sequence[np.ndarray]) -> tuple | InstanceError:
        try:
            return tuple(self._runtime().predict(list(args)))
        except Exception as exc:  # a runtime failure fails this instance only
            return model_failure(exc)

    def run_batch(
        self, rows: Sequence[Sequence[np.ndarray]], runtime: Any = None, pad_to: int | None = None
    ) -> list[tuple | InstanceError]:
        """One device call for rows of identical shapes (at most max_batch_size),
        padded with zero rows up to the next bucket."""
        n = len(rows)
        size = pad_to or self.padded_size(n)
        arrays = []
        for i, batched in enumerate(self.batched_inputs):
            if not batched:
                arrays.append(rows[0][i])
                continue
            stacked = np.stack([row[i] for row in rows])
            if size > n:
                pad = np.zeros((size - n,) + stacked.shape[1:], stacked.dtype)
                stacked = np.concatenate([stacked, pad])
            arrays.append(stacked)
        try:
            outputs = (runtime or self._runtime()).predict(arrays)
        except Exception as exc:
            return [model_failure(exc)] * n
        return [tuple(out[j] for out in outputs) for j in range(n)]

    def padded_size(self, n: int) -> int:
        """The batch a call of ``n`` rows is padded to: the smallest bucket that fits."""
        for size in self.buckets:
            if size >= n:
                return size
        return n

    def warm_up(self, on_bucket: Callable[[int, int, int | None], None] | None = None) -> None:
        """Compile every shape the request path will use, before the first request.

        ``on_bucket(k, n, batch_size)`` is called as the runtime starts on the k-th of
        n shapes (over all devices), for a progress display."""
        from ..backends import concrete_shapes

        sizes: list[int | None] = list(self.buckets) if self.model.with_batch_dim else [None]
        plans = []
        for runtime in self.runtimes:
            pairs = [(size, s) for size in sizes if (s := concrete_shapes(runtime.inputs, size)) is not None]
            if pairs and hasattr(runtime, "warm_up"):
                plans.append((runtime, pairs))
        total = sum(len(pairs) for _, pairs in plans)
        done = 0
        for runtime, pairs in plans:
            runtime.warm_up(_Reporting(pairs, done, total, on_bucket) if on_bucket else [s for _, s in pairs])
            done += len(pairs)

    @property
    def compile_count(self) -> int:
        return sum(getattr(r, "compile_count", 0) for r in self.runtimes)



class _Reporting(Sequence):
    """The shapes handed to a runtime's ``warm_up``, reporting each one as the
    runtime takes it (runtimes compile shape by shape as they iterate), so progress
    is per compiled shape without changing the backend interface."""

    def __init__(self, pairs: list, before: int, total: int, on_bucket: Callable[[int, int, int | None], None]):
        self._pairs = pairs
        self._before = before
        self._total = total
        self._on_bucket = on_bucket

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [shape for _, shape in self._pairs[index]]
        return self._pairs[index][1]

    def __iter__(self) -> Iterator[Any]:
        for k, (size, shape) in enumerate(self._pairs):
            self._on_bucket(self._before + k + 1, self._total, size)
            yield shape
