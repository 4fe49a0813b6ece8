"""Spreading keep-alive connections evenly over worker processes on one socket.

Worker processes that inherit one listening socket get new connections by whoever
calls ``accept`` first. Keep-alive clients open their connections at once, so the
race often hands all of them to one worker while the others idle, and a keep-alive
connection stays where it landed: four clients on two workers split 4/0 or 3/1 as
often as 2/2, and throughput swings by half between runs.

`ConnectionBalance` is a small table in memory shared by the workers: each worker
publishes how many connections it holds, with a heartbeat, and only offers to
accept while it holds no more than the least loaded live worker (plus an eighth,
so that a burst of hundreds of connections is accepted in batches, not in turns). The least loaded
worker always accepts, so a connection never waits on the balance; a worker that
died (no fresh heartbeat) is left out of the comparison.

A worker that has just accepted rings the others' bells (one pipe per worker, which
each polls with its connections): a worker that declined its turn looks again at
once instead of at its next poll timeout, so the workers together accept at the
kernel's pace.

Readiness: a front-end still loading (``serving`` false) declines whenever another
live worker serves, so new clients never land on a front-end that would answer 503;
while none serves yet (start-up), all accept, and answer ``/ready`` 503.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from typing import Sequence

_SLOT = 3  # int64s per worker: open connections, heartbeat (monotonic ms), serving (0/1)
_STALE_MS = 3000  # a serving worker's loop wakes at least once a second


class ConnectionBalance:
    """One worker's view of the shared table (``index`` is its slot)."""

    def __init__(self, fd: int, workers: int, index: int, bells: Sequence[Sequence[int]] = ()):
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is not in 0..{workers - 1}")
        self.workers = workers
        self.index = index
        self.serving = False  # set once this worker serves the servables
        # (read end, write end) of every worker's bell; this worker polls its own.
        self.bell = bells[index][0] if bells else None
        self._others = [w for i, (_, w) in enumerate(bells) if i != index]
        for w in self._others:
            os.set_blocking(w, False)
        self._map = mmap.mmap(fd, workers * _SLOT * 8)
        self._table = memoryview(self._map).cast("q")
        # A replacement starts out of the comparison: its predecessor's last count
        # and heartbeat must not make the others decline while it is still loading.
        self._table[index * _SLOT] = 0
        self._table[index * _SLOT + 1] = 0
        self._table[index * _SLOT + 2] = 0

    @staticmethod
    def create_table(workers: int) -> int:
        """A zeroed table for ``workers`` slots; returns its file descriptor, which
        worker processes inherit (``pass_fds``)."""
        handle = tempfile.TemporaryFile(prefix="mserve-balance-")
        fd = os.dup(handle.fileno())
        handle.close()
        os.ftruncate(fd, workers * _SLOT * 8)
        return fd

    @staticmethod
    def create_bells(workers: int) -> list[tuple[int, int]]:
        """One pipe per worker, (read end, write end): inherited by every worker."""
        return [os.pipe() for _ in range(workers)]

    @staticmethod
    def forget(fd: int, workers: int, index: int) -> None:
        """Take worker ``index`` out of the comparison at once (the pool calls this
        when the worker dies, so the others need not wait for its heartbeat to age)."""
        with mmap.mmap(fd, workers * _SLOT * 8) as table:
            view = memoryview(table).cast("q")
            view[index * _SLOT + 1] = 0
            view.release()

    def may_accept(self, connections: int) -> bool:
        """Publish this worker's ``connections`` and say whether it should accept."""
        table = self._table
        now = time.monotonic_ns() // 1_000_000
        mine = self.index * _SLOT
        serving = self.serving
        table[mine] = connections
        table[mine + 1] = now
        table[mine + 2] = 1 if serving else 0
        for slot in range(0, self.workers * _SLOT, _SLOT):
            if slot == mine or now - table[slot + 1] >= _STALE_MS:
                continue
            if bool(table[slot + 2]) != serving:
                if not serving:
                    return False  # another worker serves: new clients are its
                continue  # a worker still loading takes no turn
            if table[slot] + (table[slot] >> 3) < connections:
                return False  # another worker holds fewer (by more than an eighth, once many are open)
        return True

    def ring_others(self) -> None:
        """Tell the other workers to look at the table again (after an accept)."""
        for w in self._others:
            try:
                os.write(w, b"\0")
            except (BlockingIOError, BrokenPipeError, InterruptedError):
                pass  # rung already, and not yet heard

    def close(self) -> None:
        self._table[self.index * _SLOT + 1] = 0  # leave the comparison at once
        self._table.release()
        self._map.close()
