"""The batched access-log handler (`mserve.ops.batched_log`): records are written in
order by its writer thread, flushed on demand and at close, and a stream that cannot
keep up costs counted drops, not unbounded memory."""

from __future__ import annotations

import io
import logging
import threading
import time

from mserve.ops.batched_log import BatchedStreamHandler


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def test_records_are_written_in_order_by_the_writer_thread():
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=0.02)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = _logger(handler, "test.batched.order")
    try:
        threads = [threading.Thread(target=lambda t=t: [logger.info("t%d %d", t, i) for i in range(200)])
                   for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 5
        while stream.getvalue().count("\n") < 800 and time.monotonic() < deadline:
            time.sleep(0.01)  # nobody flushed: the writer thread writes
        lines = stream.getvalue().splitlines()
        assert len(lines) == 800
        for t in range(4):
            assert [line for line in lines if line.startswith(f"t{t} ")] == [f"t{t} {i}" for i in range(200)]
    finally:
        handler.close()


def test_flush_and_close_write_what_is_queued():
    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=60)  # the writer thread would wait a minute
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = _logger(handler, "test.batched.flush")
    logger.info("first")
    assert stream.getvalue() == ""  # not written on the logging thread
    handler.flush()
    assert stream.getvalue() == "INFO first\n"
    logger.warning("second")
    handler.close()
    assert stream.getvalue() == "INFO first\nWARNING second\n"
    logger.info("late")  # after close: written through
    assert stream.getvalue().endswith("INFO late\n")


class _Stuck(io.StringIO):
    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_stuck_stream_drops_records_and_says_how_many():
    stream = _Stuck()
    handler = BatchedStreamHandler(stream, interval=0.01, max_pending=10)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = _logger(handler, "test.batched.stuck")
    try:
        logger.info("first")
        time.sleep(0.2)  # the writer thread is now stuck writing "first"
        for i in range(25):
            logger.info("r%d", i)  # returns at once: the stream is never touched here
        assert handler.dropped == 15
        stream.release.set()
        handler.flush()
        lines = stream.getvalue().splitlines()
        assert lines[:11] == ["first", *(f"r{i}" for i in range(10))]
        assert "15 log record(s) dropped: the log stream could not keep up" in lines
    finally:
        stream.release.set()
        handler.close()


def test_deferred_access_records_keep_their_facts_and_time():
    """With deferral on, `log_request` only queues; the writer thread makes the records
    (the request's time, every access field) and hands them to the logger."""
    from mserve.ops.access_log import DeferredRecords, access_log, log_request
    import mserve.ops.access_log as access_module

    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=60)
    handler.setFormatter(logging.Formatter("%(message)s"))
    seen: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = seen.append  # type: ignore[method-assign]
    saved = access_log.handlers[:], access_log.level, access_log.propagate, access_module.deferred
    access_log.handlers, access_log.propagate = [handler, collector], False
    access_log.setLevel(logging.INFO)
    access_module.deferred = deferral = DeferredRecords(interval=0.02, max_pending=5)
    try:
        deferral.enable()
        before = time.time()
        log_request("POST", "/model/add:add_common", 200, 0.0015, "rid-1", {"REMOTE_ADDR": "10.0.0.1",
                    "CONTENT_LENGTH": "70"}, 42)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        [record] = seen
        assert record.getMessage() == "POST /model/add:add_common 200 1.50ms request_id=rid-1"
        assert (record.request_id, record.remote_addr, record.bytes_in, record.bytes_out) == ("rid-1", "10.0.0.1",
                                                                                          70, 42)
        assert before <= record.created <= before + 1
        assert stream.getvalue() == record.getMessage() + "\n"  # the handler was flushed with the batch

        deferral.active = True
        with deferral._lock:  # the writer thread is held: records pile up
            for i in range(8):
                log_request("POST", "/p", 200, 0.001, f"r{i}", {}, 1)
            assert deferral.dropped == 3
        deferral.disable()
        messages = [r.getMessage() for r in seen[1:]]
        assert [m.split("request_id=")[1] for m in messages[:5]] == ["r0", "r1", "r2", "r3", "r4"]
        assert messages[5] == "3 access-log record(s) dropped: the log could not keep up"
    finally:
        access_log.handlers, level, access_log.propagate, access_module.deferred = saved[0], saved[1], saved[2], saved[3]
        access_log.setLevel(level)
        handler.close()


def test_access_lines_made_without_records_read_exactly_as_formatted_records():
    """With the default set-up (one batched handler, the access formatter, no filters)
    the writer thread makes each line straight from the facts; the line is the one
    the formatter gives for the record. Anything else set up gets records again."""
    from mserve import logsetup
    from mserve.ops.access_log import DeferredRecords, _record, access_log, log_request
    import mserve.ops.access_log as access_module

    stream = io.StringIO()
    handler = BatchedStreamHandler(stream, interval=60)
    handler.setFormatter(logsetup.access_formatter())
    saved = access_log.handlers[:], access_log.level, access_log.propagate, access_module.deferred
    access_log.handlers, access_log.propagate = [handler], False
    access_log.setLevel(logging.INFO)
    access_module.deferred = deferral = DeferredRecords(interval=60)
    try:
        deferral.enable()
        facts = ("POST", "/model/add:add_common", 200, 1.234, "rid-7", "10.0.0.1", 70, 42)
        created = 1_800_000_123.75
        expected = logsetup.access_formatter().format(_record(logging.INFO, created, facts))
        deferral.submit(logging.INFO, created, facts)
        deferral.flush()
        assert stream.getvalue() == expected + "\n"
        assert expected.endswith(" POST /model/add:add_common 200 1.23ms request_id=rid-7")

        seen: list[logging.LogRecord] = []

        class Keep(logging.Filter):
            def filter(self, record):
                seen.append(record)
                return True

        handler.addFilter(Keep())  # a filter wants records: it gets them
        log_request("POST", "/p", 404, 0.002, "rid-8", {}, 1)
        deferral.flush()
        assert [r.getMessage() for r in seen] == ["POST /p 404 2.00ms request_id=rid-8"]
        assert stream.getvalue().splitlines()[-1].endswith("POST /p 404 2.00ms request_id=rid-8")
    finally:
        deferral.disable()
        access_log.handlers, level, access_log.propagate, access_module.deferred = saved[0], saved[1], saved[2], saved[3]
        access_log.setLevel(level)
        handler.close()
