"""The run directory of one server (``/tmp/mserve-*``): metrics files, the device
manifest, the distributed group's status, device sockets. Its files are written by
one process and followed by others (`ReplacedFile`). `stop` removes it; a main process killed outright
(``kill -9``) cannot, so every new one is marked with its owner (pid and the
process's start time, which a reused pid does not share) and the next server that
starts removes the directories whose owner is gone.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("mserve.rundir")

PREFIX = "mserve-"
_OWNER = "owner"


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def create() -> str:
    """A new run directory owned by this process (stale ones are removed first)."""
    remove_stale()
    path = tempfile.mkdtemp(prefix=PREFIX)
    with open(os.path.join(path, _OWNER), "w") as owner:
        owner.write(f"{os.getpid()} {_started(os.getpid()) or ''}\n")
    return path


def remove_stale() -> list[str]:
    """Remove the run directories (of this user) whose owning process is gone."""
    removed = []
    for path in glob.glob(os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        try:
            if not os.path.isdir(path) or os.stat(path).st_uid != os.getuid():
                continue
            pid_text, _, started = open(os.path.join(path, _OWNER)).read().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # not a run directory, or one being created right now
        alive = _started(pid)
        if alive is not None and (not started or alive == started):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d run director%s left by servers that were killed: %s", len(removed),
                 "y" if len(removed) == 1 else "ies", ", ".join(removed))
    return removed


class ReplacedFile:
    """A run-directory file that its writer replaces whole (write a new file, rename
    it over the old one), followed by readers in other processes: each version is a
    new inode, so ``stat`` tells a new one from the last read without reading it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None  # (mtime_ns, inode) of the version last read

    def read_if_new(self, read: Callable[[Path], Any]) -> Any:
        """``read(path)`` for a version not read yet, else None (also while the file
        does not exist). What ``read`` raises reaches the caller, and that version is
        tried again next time."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        version = (st.st_mtime_ns, st.st_ino)
        if version == self._seen:
            return None
        data = read(self.path)
        self._seen = version
        return data
