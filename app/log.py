"""``mserve.log``: MindSpore Serving's ``mindspore_serving.log`` in shape.

Start scripts and servable configs written for MindSpore Serving log with
``from mindspore_serving import log as logger; logger.info(...)``, and set the level
with MindSpore's environment variables. This module keeps those names so the import
swap is all they need, and it speaks for mserve's own loggers too: importing it
sends everything logged under ``mserve`` to stderr in MindSpore's line format
(``[LEVEL] SERVING(pid:thread,process):time [file:line] message``), at the level
MindSpore's variables ask for:

* ``GLOG_v``: 0 DEBUG, 1 INFO, 2 WARNING (the default), 3 ERROR;
* ``MS_SUBMODULE_LOG_v``: ``{SERVING:1}`` overrides ``GLOG_v`` for Serving.

An application that configures Python logging itself need not import this module;
mserve's loggers then follow that configuration as before.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

LOGGER_NAME = "mserve"
DEFAULT_GLOG_LEVEL = 2
_GLOG_TO_LEVEL = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
_LEVEL_TO_GLOG = {level: glog for glog, level in _GLOG_TO_LEVEL.items()}
_SUBMODULE = re.compile(r"SERVING\s*:\s*(\d)")


class MindSporeFormatter(logging.Formatter):
    """MindSpore's log line: ``[INFO] SERVING(pid:thread,process):2026-12-01-10:00:00.123.456 [file:line] msg``."""

    def __init__(self) -> None:
        super().__init__("[%(levelname)s] SERVING(%(process)d:%(thread)d,%(processName)s):%(asctime)s "
                         "[%(pathname)s:%(lineno)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        micros = f"{int(record.msecs * 1000):06d}"
        return f"{time.strftime('%Y-%m-%d-%H:%M:%S', self.converter(record.created))}.{micros[:3]}.{micros[3:]}"


def glog_level(environ: Any = None) -> int:
    """The GLOG level (0..3) the environment asks Serving to log at."""
    environ = os.environ if environ is None else environ
    submodule = _SUBMODULE.search(environ.get("MS_SUBMODULE_LOG_v", ""))
    raw = submodule.group(1) if submodule else environ.get("GLOG_v", "").strip()
    if not raw:
        return DEFAULT_GLOG_LEVEL
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"GLOG_v must be one of 0 (DEBUG), 1 (INFO), 2 (WARNING), 3 (ERROR), got {raw!r}") from None
    if value not in _GLOG_TO_LEVEL:
        raise ValueError(f"GLOG_v must be one of 0 (DEBUG), 1 (INFO), 2 (WARNING), 3 (ERROR), got {raw!r}")
    return value


class _StderrHandler(logging.StreamHandler):
    """The handler this module installs (recognised so it is installed once). It
    looks up ``sys.stderr`` at each record, so redirections made later still apply."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def get_logger() -> logging.Logger:
    """The ``mserve`` logger, set up once from the environment as described above."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(MindSporeFormatter())
        logger.addHandler(handler)
        logger.setLevel(_GLOG_TO_LEVEL[glog_level()])
        logger.propagate = False  # as MindSpore's: its lines are its own, not the root logger's
    return logger


def debug(msg: Any, *args: Any, **kwargs: Any) -> None:
    """Log ``msg`` with severity DEBUG."""
    get_logger().debug(msg, *args, stacklevel=2, **kwargs)


def info(msg: Any, *args: Any, **kwargs: Any) -> None:
    """Log ``msg`` with severity INFO."""
    get_logger().info(msg, *args, stacklevel=2, **kwargs)


def warning(msg: Any, *args: Any, **kwargs: Any) -> None:
    """Log ``msg`` with severity WARNING."""
    get_logger().warning(msg, *args, stacklevel=2, **kwargs)


def error(msg: Any, *args: Any, **kwargs: Any) -> None:
    """Log ``msg`` with severity ERROR."""
    get_logger().error(msg, *args, stacklevel=2, **kwargs)


def get_level() -> str:
    """The level as MindSpore reports it: ``"0"`` DEBUG .. ``"3"`` ERROR."""
    return str(_LEVEL_TO_GLOG.get(get_logger().getEffectiveLevel(), DEFAULT_GLOG_LEVEL))


get_logger()  # importing the module is the opt-in (see the module docstring)
