"""A thread pool that gives each call to the thread that went idle last.

grpcio's server hands every call to a `concurrent.futures` pool. The standard pool
puts calls on one queue that all its idle threads wait on, so a steady stream of
quick calls is spread round-robin over every thread the pool ever started (16 by
default): each call wakes a thread that has been asleep longest, its stack and
data cold in the cache, and under load many threads take turns at the GIL. This
pool keeps its idle threads on a stack and wakes the one that finished last, so
quick calls keep running on the same one or two threads, while calls that block (a
model in a device process, a batch being gathered) still get up to ``max_workers``
threads side by side. Calls beyond that wait in arrival order.
"""

from __future__ import annotations

import collections
import threading
from concurrent import futures
from typing import Any, Callable

_Item = tuple[futures.Future, Callable[..., Any], tuple, dict]


class _Worker:
    def __init__(self, pool: "RecentFirstPool", item: _Item):
        self.pool = pool
        self.item: _Item | None = item
        self.wake = threading.Lock()
        self.wake.acquire()  # held while idle: `submit` releases it with an item in hand

    def run(self) -> None:
        item = self.item
        while item is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - the future carries it
                    self.pool._finishing()
                    future.set_exception(exc)
                else:
                    self.pool._finishing()
                    future.set_result(result)
            else:
                self.pool._finishing()
            del item, future, fn, args, kwargs  # nothing of a finished call kept while idle
            item = self.pool._next(self)


class RecentFirstPool(futures.Executor):
    """``max_workers`` threads at most, named ``{name}-N``, started as calls need them."""

    def __init__(self, max_workers: int, name: str):
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.max_workers = max_workers
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._waiting: collections.deque[_Item] = collections.deque()
        self._started = 0
        self._about_idle = 0  # threads done with a call, on their way to `_next`
        self._shut = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        item: _Item = (futures.Future(), fn, args, kwargs)
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._idle:
                worker = self._idle.pop()
                worker.item = item
                worker.wake.release()
            elif self._about_idle:
                self._waiting.append(item)  # a thread about to be idle takes it: no new thread
            elif self._started < self.max_workers:
                self._started += 1
                worker = _Worker(self, item)
                threading.Thread(target=worker.run, name=f"{self.name}-{self._started - 1}", daemon=True).start()
            else:
                self._waiting.append(item)
        return item[0]

    def _finishing(self) -> None:
        """A thread is done with its call (said before its caller learns the result,
        whose next call would otherwise find no idle thread and start one)."""
        with self._lock:
            self._about_idle += 1

    def _next(self, worker: _Worker) -> _Item | None:
        """The finished ``worker``'s next call: a waiting one, else whatever `submit`
        hands it once it is the most recently idle; None at shutdown."""
        with self._lock:
            self._about_idle -= 1
            if self._waiting:
                return self._waiting.popleft()
            if self._shut:
                return None
            worker.item = None
            self._idle.append(worker)
        worker.wake.acquire()
        return worker.item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                while self._waiting:
                    self._waiting.popleft()[0].cancel()
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.wake.release()  # with no item: the thread ends
