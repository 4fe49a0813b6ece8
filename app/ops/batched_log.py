"""A log handler that writes in batches, from a thread of its own: for the access log.

A plain `logging.StreamHandler` takes its lock, formats and writes (one ``write``
syscall, one flush) on the thread that logs, for every record. For the access log,
that is every request, on the thread that serves it: the lock serializes the
serving threads, and the write costs about as much as a small model's predict.
`BatchedStreamHandler` instead appends the record to a queue (no lock, no I/O)
and a writer thread, every ``interval`` seconds, formats what has queued and writes
it in one ``write``. Lines appear up to ``interval`` later, in order; `flush` (also
run by `logging.shutdown` at exit, and by `close`) writes what is queued at once.

The queue is bounded (``max_pending`` records): should the stream fall that far
behind (a blocked pipe), further records are dropped and counted, and the next
batch says how many, so a stuck log costs bounded memory and nothing is lost
silently.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from typing import IO, Any


class BatchedStreamHandler(logging.Handler):
    """Formats and writes records to ``stream`` (``None``: whatever ``sys.stderr`` is
    at write time) in batches, every ``interval`` seconds, from a writer thread."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 0.05, max_pending: int = 100_000):
        super().__init__()
        self._stream = stream
        self.interval = interval
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: collections.deque[logging.LogRecord | str] = collections.deque()
        self._write_lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    def handle(self, record: logging.LogRecord) -> Any:
        # Replaces Handler.handle, which would take the handler's lock around emit.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self._queue(record)

    def emit_line(self, line: str) -> None:
        """Queue a line already formatted (`mserve.ops.access_log` makes access lines
        itself when this handler's formatter can say what they look like)."""
        self._queue(line)

    def _queue(self, item: logging.LogRecord | str) -> None:
        if self._stopped.is_set():
            with self._write_lock:  # after close (late requests at exit): write through
                self._write([item])
            return
        if len(self._pending) >= self.max_pending:
            self.dropped += 1  # counted without a lock: a lost increment only understates
            return
        self._pending.append(item)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="mserve-log-writer", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if self._pending or self.dropped:
                self.flush()

    def flush(self) -> None:
        """Write every queued record now."""
        with self._write_lock:
            records = []
            pending = self._pending
            while pending:
                records.append(pending.popleft())
            self._write(records)

    def _write(self, records: list[logging.LogRecord | str]) -> None:
        lines = []
        for record in records:
            if isinstance(record, str):
                lines.append(record)
                continue
            try:
                lines.append(self.format(record))
            except Exception:  # noqa: BLE001 - a bad record must not cost the others their lines
                self.handleError(record)
        dropped, self.dropped = self.dropped, 0
        if dropped:
            lines.append(f"{dropped} log record(s) dropped: the log stream could not keep up")
        if not lines:
            return
        try:
            stream = self.stream
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - like StreamHandler: report, go on
            last = records[-1] if records else None
            self.handleError(last if isinstance(last, logging.LogRecord) else logging.makeLogRecord({"msg": last}))

    def close(self) -> None:
        self.flush()
        self._stopped.set()
        super().close()
