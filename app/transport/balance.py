"""Spreading keep-alive connections evenly over worker processes on one socket.

Worker processes that inherit one listening socket get new connections by whoever
calls ``accept`` first. Keep-alive clients open their connections at once, so the
race often hands all of them to one worker while the others idle, and a keep-alive
connection stays where it landed: four clients on two workers split 4/0 or 3/1 as
often as 2/2, and throughput swings by half between runs.

`ConnectionBalance` is a small table in memory shared by the workers: each worker
publishes how many connections it holds, with a heartbeat, and only offers to
accept while it holds no more than the least loaded live worker. The least loaded
worker always accepts, so a connection never waits on the balance; a worker that
died or is still loading (no fresh heartbeat) is left out of the comparison.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time

_SLOT = 2  # int64s per worker: open connections, heartbeat (monotonic ms)
_STALE_MS = 3000  # a serving worker's loop wakes at least once a second


class ConnectionBalance:
    """One worker's view of the shared table (``index`` is its slot)."""

    def __init__(self, fd: int, workers: int, index: int):
        if not 0 <= index < workers:
            raise ValueError(f"worker index {index} is not in 0..{workers - 1}")
        self.workers = workers
        self.index = index
        self._map = mmap.mmap(fd, workers * _SLOT * 8)
        self._table = memoryview(self._map).cast("q")
        # A replacement starts out of the comparison: its predecessor's last count
        # and heartbeat must not make the others decline while it is still loading.
        self._table[index * _SLOT] = 0
        self._table[index * _SLOT + 1] = 0

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
        table[mine] = connections
        table[mine + 1] = now
        for slot in range(0, self.workers * _SLOT, _SLOT):
            if slot != mine and now - table[slot + 1] < _STALE_MS and table[slot] < connections:
                return False
        return True

    def close(self) -> None:
        self._table[self.index * _SLOT + 1] = 0  # leave the comparison at once
        self._table.release()
        self._map.close()
