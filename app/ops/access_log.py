"""The access log and request ids.

Every request gets a request id: the client's ``X-Request-ID`` when it is a sane
token (1-128 characters of ``A-Z a-z 0-9 . _ : / + = @ -``), otherwise a new one
(16 hex digits). The reply echoes it in ``X-Request-ID``. One record per request goes to
the ``mserve.access`` logger; its message reads like

    POST /model/add:add_common 200 0.52ms request_id=6f1c2a9be0d34c17

and the record carries the same facts as attributes (``request_id``, ``http_method``,
``path``, ``status``, ``duration_ms``, ``remote_addr``, ``bytes_in``, ``bytes_out``),
so `JsonFormatter` writes one JSON object per line:

    handler.setFormatter(mserve.ops.access_log.JsonFormatter())

While a request runs, `current_request_id` holds its id; `RequestIdFilter` copies it
onto any record logged meanwhile (a predict error, a stage's own logging), so a
failure can be matched with its access-log line. Probes (``/health``, ``/ready``,
``/metrics``) are logged at DEBUG, everything else at INFO.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import datetime
import itertools
import logging
import os
import re
import threading
import time
from typing import Any

import orjson

access_log = logging.getLogger("mserve.access")

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("mserve_request_id", default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
FIELDS = ("request_id", "http_method", "path", "status", "duration_ms", "remote_addr", "bytes_in", "bytes_out")


# New ids: a random per-process prefix and a counter (16 hex digits), cheaper than
# random bytes per request and still unique across processes in practice.
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(int.from_bytes(os.urandom(3), "big"))


def request_id(environ: dict[str, Any]) -> str:
    """The client's X-Request-ID when sane, else a new id."""
    return checked_request_id(environ.get("HTTP_X_REQUEST_ID"))


def checked_request_id(given: str | None) -> str:
    """``given`` (a client's X-Request-ID) when sane, else a new id."""
    if given and _SANE_ID.fullmatch(given):
        return given
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"


def log_request(
    method: str, path: str, status: int, seconds: float, rid: str, environ: dict[str, Any], bytes_out: int | None
) -> None:
    """One access-log record (cheap when the logger is off for that level; cheaper
    still when `deferred` is on: then the record is made on its writer thread)."""
    level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    facts = (method, path, status, round(seconds * 1e3, 3), rid, environ.get("REMOTE_ADDR"),
             int(environ.get("CONTENT_LENGTH") or 0), bytes_out)
    if deferred.active:
        deferred.submit(level, time.time(), facts)
    else:
        access_log.handle(_record(level, time.time(), facts))


_MESSAGE = "%s %s %d %.2fms request_id=%s"


def line_writer(level: int) -> Any:
    """The ``mserve.access`` logger's one handler when records of ``level`` would
    reach it unchanged and it takes ready lines (``emit_line``) from a formatter that
    makes them (``access_line``): then a line costs no `logging.LogRecord`. None when
    anything else is set up (filters, several handlers, another formatter)."""
    handlers = access_log.handlers
    if len(handlers) != 1 or access_log.filters or access_log.propagate or access_log.disabled:
        return None
    handler = handlers[0]
    if (handler.filters or level < handler.level or not hasattr(handler, "emit_line")
            or not hasattr(handler.formatter, "access_line")):
        return None
    return handler


def _record(level: int, created: float, facts: tuple) -> logging.LogRecord:
    method, path, status, ms, rid, remote, bytes_in, bytes_out = facts
    record = access_log.makeRecord(
        access_log.name, level, __file__, 0, _MESSAGE, (method, path, status, ms, rid), None,
        extra={"request_id": rid, "http_method": method, "path": path, "status": status, "duration_ms": ms,
               "remote_addr": remote, "bytes_in": bytes_in, "bytes_out": bytes_out},
    )
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


class DeferredRecords:
    """Access records made and handled on a writer thread instead of the request's.

    Making a `logging.LogRecord` and passing it through the logger costs a request
    thread more than the add servable's model call; with `enable` (what `mserve
    start` and its front-end processes do), `log_request` only queues the record's
    facts and its time, and a writer thread turns what has queued into records every
    ``interval`` seconds, hands them to the ``mserve.access`` logger (its filters and
    handlers, unchanged) and flushes its handlers once per batch. Records keep the
    time of their request; lines appear up to ``interval`` later. The queue holds at
    most ``max_pending`` records: beyond, records are dropped, counted, and the
    count logged as a warning, so a stuck log stream cannot eat the memory."""

    def __init__(self, interval: float = 0.05, max_pending: int = 100_000):
        self.interval = interval
        self.max_pending = max_pending
        self.active = False
        self.dropped = 0
        self._pending: collections.deque[tuple[int, float, tuple]] = collections.deque()
        self._lock = threading.Lock()  # one batch at a time (writer thread, flush)
        self._thread: threading.Thread | None = None

    def enable(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mserve-access-log", daemon=True)
                self._thread.start()
            self.active = True
        atexit.register(self.flush)

    def disable(self) -> None:
        """Back to records made on the request thread (after writing what is queued)."""
        self.active = False
        self.flush()

    def submit(self, level: int, created: float, facts: tuple) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped += 1  # without a lock: a lost increment only understates
            return
        self._pending.append((level, created, facts))

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._pending or self.dropped:
                self.flush()

    def flush(self) -> None:
        """Hand every queued record to the logger now."""
        with self._lock:
            pending = self._pending
            if not pending and not self.dropped:
                return
            writers: dict[int, Any] = {}
            while pending:
                level, created, facts = pending.popleft()
                writer = writers.get(level, False)
                if writer is False:
                    writer = writers[level] = line_writer(level)
                if writer is not None:
                    writer.emit_line(writer.formatter.access_line(created, _MESSAGE % facts[:5]))
                else:
                    access_log.handle(_record(level, created, facts))
            dropped, self.dropped = self.dropped, 0
            if dropped:
                access_log.warning("%d access-log record(s) dropped: the log could not keep up", dropped)
            for handler in access_log.handlers:
                handler.flush()


deferred = DeferredRecords()


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the running request's, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the
    access fields present on the record, and the exception text if any."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()
