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

import contextvars
import datetime
import itertools
import logging
import os
import re
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
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and _SANE_ID.fullmatch(given):
        return given
    return f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFF:08x}"


def log_request(
    method: str, path: str, status: int, seconds: float, rid: str, environ: dict[str, Any], bytes_out: int | None
) -> None:
    """One access-log record (cheap when the logger is off for that level)."""
    level = logging.DEBUG if path in PROBE_PATHS else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    ms = seconds * 1e3
    access_log.log(
        level,
        "%s %s %d %.2fms request_id=%s",
        method, path, status, ms, rid,
        extra={
            "request_id": rid,
            "http_method": method,
            "path": path,
            "status": status,
            "duration_ms": round(ms, 3),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "bytes_in": int(environ.get("CONTENT_LENGTH") or 0),
            "bytes_out": bytes_out,
        },
    )


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
