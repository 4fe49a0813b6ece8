"""A model stage: checks each instance against the model, batches, calls the runtime.

Per-instance inputs are checked against the model's declared inputs (exact dtype, and
shape without the batch dimension), so one bad instance fails alone. Good rows are
then run in as few device calls as the model allows: stacked into the batch
dimension (``with_batch_dim=True``, padded up to a fixed batch size), or one call
per instance otherwise. `ModelStage.run` takes rows from any number of requests, so a
cross-request batcher can sit in front of it.
"""

from __future__ import annotations

import itertools
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

    def name_inputs(self, methods: Sequence[Any]) -> None:
        """Learn from the methods' wiring what feeds each model input (``input 'x1'``,
        ``output 0 of add_trans_datatype``), so a dtype or shape error names it, not
        only its position. A model fed differently by several methods lists each."""
        for i in range(len(self.inputs)):
            fed: dict[str, list[str]] = {}
            for method in methods:
                for stage in method.stages:
                    if stage.target is not self.model or i >= len(stage.inputs):
                        continue
                    slot = stage.inputs[i]
                    if slot.index < len(method.input_names):
                        label = f"input '{method.input_names[slot.index]}'"
                    else:
                        label = slot.label
                    fed.setdefault(label, []).append(method.name)
            if len(fed) == 1:
                self.input_labels[i] = next(iter(fed))
            elif fed:
                self.input_labels[i] = ", ".join(
                    f"{label} in method {'/'.join(names)}" for label, names in fed.items()
                )

    def _named(self, index: int) -> str:
        """`` (model input 0 is input 'x1')`` after MindSpore's text, when known."""
        label = self.input_labels[index] if index < len(self.input_labels) else None
        return f" (model input {index} is {label})" if label else ""

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
        """The row as arrays, or `InstanceError` (MindSpore's wording) unless ``args``
        fit the model. Numpy scalars (what arithmetic on 0-d arrays returns in a
        Python stage) count as 0-d arrays."""
        row = tuple(np.asarray(v) if isinstance(v, np.generic) else v for v in args)
        for i, (value, spec) in enumerate(zip(row, self.inputs)):
            if not isinstance(value, np.ndarray) or value.dtype != spec.dtype:
                raise InstanceError(
                    f"Given model input {i} data type {_type_name(value)} not match the data type {spec.dtype.name}"
                    f" defined in model{self._named(i)}"
                )
            want = self.instance_shape(i)
            if want is not None and (
                len(want) != value.ndim or any(w is not None and w != g for w, g in zip(want, value.shape))
            ):
                shown = "(" + ", ".join("?" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
                raise InstanceError(
                    f"Given model input {i} size {tuple(value.shape)} not match the size {shown} defined in model"
                    f"{self._named(i)}"
                )
        return row

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
        results: list[tuple | InstanceError | None] = [None] * len(rows)
        checked: dict[int, tuple] = {}
        for i, args in enumerate(rows):
            try:
                checked[i] = self.check(args)
            except InstanceError as exc:
                results[i] = exc
        if not self.model.with_batch_dim:
            for i, row in checked.items():
                results[i] = self._call_one(row)
        else:
            groups: dict[tuple, list[int]] = {}
            for i, row in checked.items():
                groups.setdefault(self.batch_key(row), []).append(i)
            for members in groups.values():
                step = self.max_batch_size or len(members)
                for start in range(0, len(members), step):
                    chunk = members[start : start + step]
                    for i, out in zip(chunk, self.run_batch([checked[i] for i in chunk])):
                        results[i] = out
        return results  # type: ignore[return-value]

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
