"""Cross-request batching: one queue per model stage, one executor thread per device.

Request threads check their rows (so a bad instance fails alone and at once), put
them on the stage's queue and wait. Each device's executor takes the oldest row,
gathers more rows of the same shape up to the batch limit, waiting at most
``max_batch_delay`` for stragglers, pads the batch to the next compiled bucket, runs
one device call and hands every row its own result. Rows whose request has timed out
are dropped before they reach the device.

The executor only waits for rows it knows are coming: requests announce (`expect`)
how many rows they will bring once they enter their method, and count them off when
they submit. A lone request at low load is therefore never delayed, while under
load a batch waits up to ``max_batch_delay`` for requests still in preprocessing.
While one batch runs, new rows queue up, so batches also fill without any waiting.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Sequence

from .model_stage import InstanceError, ModelStage

log = logging.getLogger("mserve.serving.batching")


class _Pending:
    __slots__ = ("row", "key", "future", "deadline", "enqueued", "source")

    def __init__(self, row: tuple, key: tuple, deadline: float, source: Any = None):
        self.row = row
        self.key = key
        self.future: Future = Future()
        self.deadline = deadline
        self.enqueued = time.monotonic()
        self.source = source  # who sent the row (a front-end process), for metrics


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def batch(self, stage: ModelStage, size: int, padded: int, queue_seconds: Sequence[float], run_seconds: float) -> None:
        pass

    def queue_depth(self, stage: ModelStage, depth: int) -> None:
        pass

    def sources(self, stage: ModelStage, count: int) -> None:
        """How many different senders (front-end processes) one device call served."""


class Batcher:
    """Batches rows from concurrent requests for one `ModelStage`."""

    def __init__(
        self,
        stage: ModelStage,
        max_delay: float,
        observer: BatchObserver | None = None,
    ):
        self.stage = stage
        self.max_batch_size = stage.max_batch_size or 1
        self.max_delay = max_delay
        self.observer = observer or BatchObserver()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._coming = 0  # rows announced by requests that have not submitted yet
        self._cv = threading.Condition()
        self._stopping = False
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # rows per device call
        self._threads = [
            threading.Thread(target=self._serve, args=(runtime,), name=f"mserve-batch-{i}", daemon=True)
            for i, runtime in enumerate(stage.runtimes)
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ request side

    def expect(self, count: int) -> None:
        """A request entered a method that will bring ``count`` rows here."""
        with self._cv:
            self._coming += count

    def arrive(self, count: int) -> None:
        """Rows announced with `expect` will not come after all (they failed earlier)."""
        with self._cv:
            self._coming -= count
            self._cv.notify(len(self._threads))

    def submit(self, rows: Sequence[tuple], deadline: float, announced: int = 0, source: Any = None) -> list[Future]:
        """Queue checked rows; ``announced`` is what this request had `expect`-ed;
        ``source`` tags where they came from (see `BatchObserver.sources`)."""
        futures = []
        items = []
        for row in rows:
            try:
                row = self.stage.check(row)
            except InstanceError as exc:
                done: Future = Future()
                done.set_result(exc)
                futures.append(done)
                continue
            item = _Pending(row, self.stage.batch_key(row), deadline, source)
            items.append(item)
            futures.append(item.future)
        with self._cv:
            self._queue.extend(items)
            self._coming -= announced
            depth = len(self._queue)
            self._cv.notify(len(self._threads))
        if items:
            self.observer.queue_depth(self.stage, depth)
        return futures

    def run(self, rows: Sequence[tuple], deadline: float, announced: int = 0, source: Any = None) -> list[Any]:
        """Submit rows and wait for them: a result tuple or `InstanceError` per row."""
        results = []
        for future in self.submit(rows, deadline, announced, source):
            remaining = deadline - time.monotonic()
            try:
                results.append(future.result(timeout=max(remaining, 0)))
            except TimeoutError:
                future.cancel()
                results.append(InstanceError("Time out", status=504))
        return results

    # ------------------------------------------------------------ device side

    def _take(self) -> list[_Pending] | None:
        """The next batch: rows that can share a call (`ModelStage.batch_key`), oldest first."""
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            batch = [first]
            give_up = first.enqueued + self.max_delay
            while True:
                if self._queue:
                    keep: list[_Pending] = []
                    while self._queue and len(batch) < self.max_batch_size:
                        item = self._queue.popleft()
                        (batch if item.key == first.key else keep).append(item)
                    self._queue.extendleft(reversed(keep))
                if len(batch) >= self.max_batch_size or self._coming <= 0:
                    break
                wait = give_up - time.monotonic()
                if wait <= 0 or self._stopping:
                    break
                self._cv.wait(wait)
            depth = len(self._queue)
        self.observer.queue_depth(self.stage, depth)
        return batch

    def _serve(self, runtime: Any) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.cancelled() or not item.future.set_running_or_notify_cancel():
                    continue
                if item.deadline <= now:
                    item.future.set_result(InstanceError("Time out", status=504))
                    continue
                live.append(item)
            if not live:
                continue
            padded = self.stage.padded_size(len(live))
            started = time.monotonic()
            try:
                results = self.stage.run_batch([i.row for i in live], runtime=runtime, pad_to=padded)
            except Exception as exc:  # never lose a waiting request
                log.exception("batch failed")
                results = [InstanceError(f"Model Failed: {exc}", status=500)] * len(live)
            finished = time.monotonic()
            self.batch_sizes[len(live)] += 1
            for item, result in zip(live, results):
                item.future.set_result(result)
            self.observer.batch(
                self.stage, len(live), padded, [started - i.enqueued for i in live], finished - started
            )
            if live[0].source is not None:
                self.observer.sources(self.stage, len({i.source for i in live}))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for item in pending:
            if item.future.set_running_or_notify_cancel():
                item.future.set_result(InstanceError("server is shutting down", status=503))
        for t in self._threads:
            t.join(timeout=5)
