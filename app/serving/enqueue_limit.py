"""The process-wide limit on requests waiting in the server: MindSpore Serving's
``server.master.context.set_max_enqueued_requests``.

MindSpore keeps one limit for the whole master; mserve's RESTful and gRPC servers each
take ``max_enqueued_requests``. `EnqueueLimit` is the value they use when a start call
names none, and `set` also moves it for the servers of this process already running
on it (their admission reads ``max_enqueued_requests`` per request). Front-end
processes get the value when they start.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

DEFAULT_MAX_ENQUEUED_REQUESTS = 10000


class EnqueueLimit:
    """The limit, and the request handlers that follow it."""

    def __init__(self, value: int = DEFAULT_MAX_ENQUEUED_REQUESTS):
        self.value = value
        self._followers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def set(self, value: Any) -> None:
        """MindSpore's check and text: an int >= 1."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise RuntimeError(f"Parameter 'max_enqueued_requests' should be int, but actually {type(value)}")
        if value < 1:
            raise RuntimeError(f"Parameter 'max_enqueued_requests' should be >= 1, but actually {value}")
        with self._lock:
            self.value = value
            for handler in list(self._followers):
                handler.max_enqueued_requests = value

    def resolve(self, value: int | None) -> int:
        """A start call's ``max_enqueued_requests``: its own, or this limit."""
        return self.value if value is None else value

    def follow(self, handler: Any) -> None:
        """``handler`` (with ``max_enqueued_requests``) takes every later `set`."""
        with self._lock:
            self._followers.add(handler)


# The process's limit (MindSpore's master context is one per process too).
ENQUEUE_LIMIT = EnqueueLimit()
