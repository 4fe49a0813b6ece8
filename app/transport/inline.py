"""Which requests run on the I/O thread instead of a worker thread.

Waitress reads a request on its I/O thread (the event loop), hands it to a worker
thread, and the reply wakes the I/O thread again through a pipe. On a small
machine those two hand-offs (a thread wake-up each, the GIL changing hands, a
thread resuming on a cold core) cost more CPU than a small model's whole predict:
measured on this 2-core machine, about 90 µs per request, against about 80 µs for
the add servable's decode, model call and encode. A request known to finish quickly
is cheaper run right where it was read; then a worker process serves its
connections one request at a time, like an event-loop server.

`InlinePolicy` decides per request from what earlier requests to the same path cost:

* only predict calls (POST) with a body of at most 16 KiB, to versions without
  cross-request batchers (batching needs requests side by side in worker threads);
* the path's average cost is at most ``max_seconds`` (1 ms by default) over recent
  requests, in thread CPU time (wall time in a worker thread includes waiting for
  the GIL under load, and on a busy machine any thread gets preempted now and then);
* two inline requests in a row that spent more than twice the limit blocked (waiting
  on a device, on I/O, in a sleep, for the GIL) send the path back to the worker
  threads for a while (5 s, doubling on each repeat up to 10 minutes): CPU time does
  not show waiting, which the time on the I/O thread reveals. A request blocked
  100 ms or more sends the path back at once. (A request that holds the I/O thread
  over 100 ms gets the event loop moved to a new thread meanwhile,
  `mserve.transport.http`, so the other connections are not held up behind it.)
  Blocked time is wall time less the time on a CPU and the time spent runnable but
  waiting for one (`ThreadClock`, from the kernel's per-thread scheduler counters):
  on a busy machine a 0.3 ms request is often preempted for several milliseconds,
  which says nothing about the path. mserve's gRPC server measures with
  `RusageClock` instead, one ``getrusage`` per call (a read of the scheduler's file
  cost its event loop several µs per call under load): a call that never gave up its
  CPU of its own accord was only preempted and blocked 0; one that did counts all its
  time off the CPU as blocked.

While a request runs inline the other connections of that process wait, so the limit
bounds their extra latency. A client can still make one request of a cheap path
expensive (many instances in 16 KiB); the running average then shuts the path out
of the I/O thread for the next several requests. ``max_seconds=0`` turns the policy
off (`allows` is always false).

Costs are updated without a lock: a lost update between racing threads only nudges
an estimate.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Callable

MAX_BODY_BYTES = 16 * 1024  # a costly body to decode blocks the I/O thread once, briefly
_MIN_SAMPLES = 4
_WEIGHT = 0.2  # of the newest request in the running average
_MAX_PATHS = 4096  # paths are client-chosen: bound the table
_FIRST_BACKOFF, _MAX_BACKOFF = 5.0, 600.0
_STALL_SECONDS = 0.1  # one inline request this slow (preemption does not explain it) is enough


@dataclass
class _PathCost:
    average: float = 0.0
    count: int = 0
    slow_in_a_row: int = 0
    backoff: float = 0.0
    banned_until: float = 0.0


class ThreadClock:
    """The calling thread's time on a CPU and time spent runnable but waiting for one,
    in seconds: one ``pread`` of ``/proc/thread-self/schedstat`` (a descriptor kept
    per thread). Where that file is missing (not Linux, or a kernel without scheduler
    statistics) the CPU time comes from `time.thread_time` and the wait is 0."""

    def __init__(self):
        self._local = threading.local()
        self.precise = os.path.exists("/proc/thread-self/schedstat")

    def sample(self) -> tuple[float, float]:
        if not self.precise:
            return time.thread_time(), 0.0
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = _SchedStat()
        on_cpu, queued, _ = handle.read().split(maxsplit=2)
        return int(on_cpu) * 1e-9, int(queued) * 1e-9


class RusageClock:
    """The calling thread's ``getrusage`` (CPU time, voluntary context switches): one
    system call, no file to read. `costs` turns two readings around a call into what
    `InlinePolicy.observe` takes."""

    @staticmethod
    def sample() -> resource.struct_rusage:
        return resource.getrusage(resource.RUSAGE_THREAD)

    @staticmethod
    def costs(
        before: resource.struct_rusage, after: resource.struct_rusage, wall: float,
    ) -> tuple[float, float, float]:
        """CPU time, wall time, and blocked time: 0 unless the thread gave up its CPU
        of its own accord (a device, a lock, the GIL, a sleep); preemption alone says
        nothing about the call."""
        used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        blocked = max(0.0, wall - used) if after.ru_nvcsw != before.ru_nvcsw else 0.0
        return used, wall, blocked


class _SchedStat:
    """An open ``/proc/thread-self/schedstat`` of the thread that made it (closed with it)."""

    def __init__(self):
        self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> bytes:
        return os.pread(self.fd, 128, 0)

    def __del__(self) -> None:
        os.close(self.fd)


class InlinePolicy:
    """Per-path costs, and the decision whether a request may run on the I/O thread.

    ``eligible(path)`` says whether the method a path names may run inline at all
    (no cross-request batching); it is asked only for paths that are cheap so far.
    """

    def __init__(self, max_seconds: float, eligible: Callable[[str], bool]):
        self.max_seconds = max_seconds
        self._eligible = eligible
        self._paths: dict[str, _PathCost] = {}

    def allows(self, method: str, path: str, body_bytes: int) -> bool:
        if self.max_seconds <= 0 or method != "POST" or body_bytes > MAX_BODY_BYTES:
            return False
        cost = self._paths.get(path)
        if cost is None or cost.count < _MIN_SAMPLES or cost.average > self.max_seconds:
            return False
        if cost.banned_until and time.monotonic() < cost.banned_until:
            return False
        return self._eligible(path)

    def observe(
        self, path: str, cpu_seconds: float, inline_wall_seconds: float | None = None,
        blocked_seconds: float | None = None,
    ) -> None:
        """Record one request to ``path``: its thread CPU time, and, when it ran
        inline, its wall time and the part of it the thread was blocked (None:
        unknown, the wall time counts). The caller leaves out requests to unknown
        paths."""
        cost = self._paths.get(path)
        if cost is None:
            if len(self._paths) >= _MAX_PATHS:
                return
            cost = self._paths.setdefault(path, _PathCost())
        cost.count += 1
        cost.average = cpu_seconds if cost.count == 1 else cost.average + _WEIGHT * (cpu_seconds - cost.average)
        if inline_wall_seconds is None:
            return
        blocked = inline_wall_seconds if blocked_seconds is None else blocked_seconds
        if blocked <= 2 * self.max_seconds:
            cost.slow_in_a_row = 0
            return
        cost.slow_in_a_row += 1
        if cost.slow_in_a_row >= 2 or blocked >= _STALL_SECONDS:
            cost.slow_in_a_row = 0
            cost.backoff = min(max(cost.backoff * 2, _FIRST_BACKOFF), _MAX_BACKOFF)
            cost.banned_until = time.monotonic() + cost.backoff
