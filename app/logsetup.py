"""What mserve's log lines look like, and where they go when nobody set logging up.

One format for every process of a server, the CLI's own lines, the front-end
processes' and the device processes' alike: ``HH:MM:SS LEVEL logger: message``, with
the process named after the logger (``mserve.server [front-end 2]: ...``) when it is
not the main one. Access lines stay ``HH:MM:SS POST /model/... 200 0.52ms ...``.

A MindSpore-style start script usually sets no logging up at all; Python would then
print only warnings, without a time or a source, so the script would never say where
it listens or that it is ready. `for_start_script` gives the ``mserve`` logger a
stderr handler at INFO in that case (MindSpore Serving logs the same facts at INFO);
``MSERVE_LOG_LEVEL=warning`` (or ``error``) quiets it. Programs that configure logging
themselves (a handler on the root or on ``mserve``) are left alone.
"""

from __future__ import annotations

import logging
import os
import sys
import time

DATE = "%H:%M:%S"
ACCESS_FORMAT = "%(asctime)s %(message)s"
LEVEL_VARIABLE = "MSERVE_LOG_LEVEL"


def formatter(process: str | None = None) -> logging.Formatter:
    """The one format; ``process`` names a front-end or device process."""
    where = f" [{process}]" if process else ""
    return logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s", DATE)


class AccessFormatter(logging.Formatter):
    """The access-log format, plus `access_line`: the same line made straight from a
    request's facts, without a `logging.LogRecord` (the access log's writer thread
    makes one line per request: the record cost more than the line)."""

    def __init__(self):
        super().__init__(ACCESS_FORMAT, DATE)
        self._second = -1
        self._stamp = ""

    def access_line(self, created: float, message: str) -> str:
        """What `format` gives for a record of ``message`` logged at ``created``."""
        second = int(created)
        if second != self._second:  # one strftime per second of log, not per line
            self._stamp = time.strftime(DATE, self.converter(second))
            self._second = second
        return f"{self._stamp} {message}"


def access_formatter() -> AccessFormatter:
    return AccessFormatter()


def level_from_environment(default: str = "INFO") -> int:
    """``MSERVE_LOG_LEVEL`` (debug, info, warning, error), or ``default``."""
    name = os.environ.get(LEVEL_VARIABLE, default).strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_VARIABLE}={os.environ[LEVEL_VARIABLE]!r}: use debug, info, warning or error")
    return level


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def for_start_script() -> None:
    """Log mserve's INFO lines to stderr unless logging is already set up (idempotent)."""
    mserve = logging.getLogger("mserve")
    if mserve.handlers or logging.getLogger().handlers:
        return
    handler = StderrHandler()
    handler.setFormatter(formatter())
    mserve.addHandler(handler)
    mserve.setLevel(level_from_environment())
    access = logging.getLogger("mserve.access")
    access_handler = StderrHandler()
    access_handler.setFormatter(access_formatter())
    access.addHandler(access_handler)
    access.propagate = False


class ReadyLog:
    """Says once, at INFO, when a start script's server is ready: servables loaded and
    a port listening (MindSpore Serving logs the same). Each `Runtime` holds one;
    `mserve start`, which prints its own ``ready`` line, and the server's own child
    processes turn it off."""

    def __init__(self) -> None:
        self.enabled = True
        self.addresses: list[str] = []
        self.said = False
        self._log = logging.getLogger("mserve.server")

    def quiet(self) -> None:
        self.enabled = False

    def listening(self, address: str) -> None:
        self.addresses.append(address)

    def check(self, ready: bool, servables: list[str]) -> None:
        if not (self.enabled and ready and self.addresses and servables) or self.said:
            return
        self.said = True
        self._log.info("ready: serving %s on %s", ", ".join(servables), ", ".join(self.addresses))

    def reset(self) -> None:
        """After a stop: a server started again in this process says it again."""
        self.addresses.clear()
        self.said = False
