"""Giving memory back to the system after big requests (glibc's malloc).

A request of 100,000 small instances allocates hundreds of MB of small objects
(parsed JSON, one numpy array per value) and frees them all when it is answered.
glibc keeps freed memory in the arena that allocated it, and gives every thread
that allocates its own arena (up to eight per core): with 16 request threads, each
big request left its peak behind in another arena, and RSS climbed with the thread
count (2.3 GB after a few such requests). Two measures:

* `limit_arenas` caps the arenas at two before the server's threads start
  (``mallopt(M_ARENA_MAX)``, the setting ``MALLOC_ARENA_MAX`` would give; an
  environment variable set by the user wins, glibc reads it first);
* `release_memory` (``malloc_trim(0)``) returns the free pages of every arena after
  a request whose body was at least `RELEASE_AFTER_BYTES`; at most once per
  `_MIN_INTERVAL` seconds (a call in between schedules one trim for later), so a
  stream of big requests does not trim on every one. After such a request that
  failed (``collect=True``) it runs the garbage collector first: an exception's
  traceback holds the frames that held the request's arrays, in reference cycles
  that only the collector frees (100+ MB per failed 50 MB tensor, until the next
  collection, which allocation counts may not trigger for a long time).

Elsewhere (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time

RELEASE_AFTER_BYTES = 1 << 20
_M_ARENA_MAX = -8
_MIN_INTERVAL = 0.25

_libc: ctypes.CDLL | None = None
try:
    _candidate = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(_candidate, "malloc_trim") and hasattr(_candidate, "mallopt"):
        _libc = _candidate
except OSError:  # pragma: no cover - no C library by that name
    _libc = None

_last_trim = -_MIN_INTERVAL
_scheduled = False
_collect = False  # a big request failed since the last trim: collect cycles first
_trim_lock = threading.Lock()


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``count`` (threads then share them). Returns
    whether it applied; ``MALLOC_ARENA_MAX`` in the environment takes precedence."""
    if _libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_libc.mallopt(_M_ARENA_MAX, count))


def release_memory(collect: bool = False) -> bool:
    """Give free heap pages back to the system (after collecting reference cycles,
    with ``collect``: a big request failed). Rate-limited: a call too soon after the
    last trim schedules one for later instead. Returns whether it trimmed now."""
    global _last_trim, _scheduled, _collect
    now = time.monotonic()
    with _trim_lock:
        _collect = _collect or collect
        wait = _last_trim + _MIN_INTERVAL - now
        if wait > 0:
            if not _scheduled:
                _scheduled = True
                timer = threading.Timer(wait, _scheduled_trim)
                timer.daemon = True
                timer.start()
            return False
        _last_trim = now
        collect, _collect = _collect, False
    if collect:
        gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)
    return True


def _scheduled_trim() -> None:
    global _scheduled
    with _trim_lock:
        _scheduled = False
    release_memory()
