"""Front-end and device processes' log lines, written out by the process that
started them.

Those processes log to stderr. Had they inherited the server's stderr, their lines
would land in the middle of `mserve start`'s live progress display on a terminal:
the display is redrawn in place, and a line another process writes meanwhile is
spliced into it. So each child's stderr is a pipe, and a thread here copies what
comes out of it, whole lines only (a line is never mixed with another process's),
to this process's ``sys.stderr``: while the display runs, that is the display's
stand-in, which prints lines above it; otherwise the copy goes straight to file
descriptor 2, one write per read (an access-log batch is one read), so serving
costs no more than it did.
"""

from __future__ import annotations

import os
import sys
import threading

_READ_SIZE = 65536


class StderrRelay:
    """A pipe for one child's stderr (`child_end`, given to ``Popen(stderr=...)``) and
    the thread that copies it out. `started` closes this process's copy of the
    child's end; `join` waits for the child's last lines once it has exited."""

    def __init__(self, name: str) -> None:
        self._read_end, self.child_end = os.pipe()
        self._thread = threading.Thread(target=self._copy, name=f"mserve-stderr-{name}", daemon=True)

    def started(self) -> None:
        """Call once the child runs (it holds its own copy of the write end)."""
        os.close(self.child_end)
        self._thread.start()

    def abandon(self) -> None:
        """The child could not be started: close both ends."""
        os.close(self.child_end)
        os.close(self._read_end)

    def join(self, timeout: float = 1.0) -> None:
        self._thread.join(timeout)

    def _copy(self) -> None:
        pending = b""
        try:
            while chunk := os.read(self._read_end, _READ_SIZE):
                whole, newline, pending = (pending + chunk).rpartition(b"\n")
                if newline:
                    _write(whole + newline)
            if pending:
                _write(pending + b"\n")
        except OSError:
            pass
        finally:
            os.close(self._read_end)


def _write(data: bytes) -> None:
    stream = sys.stderr
    try:
        if stream is sys.__stderr__ and stream is not None:
            stream.flush()  # this process's own lines first: they were written before
            fd, view = stream.fileno(), memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        elif stream is not None:  # a stand-in (the progress display, a test's capture)
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
    except (OSError, ValueError):
        pass  # stderr is gone (closed, a broken pipe): the lines have nowhere to go
