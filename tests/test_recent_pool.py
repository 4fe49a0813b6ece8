"""The gRPC server's thread pool (`mserve.transport.recent_pool`): quick calls stay on
the thread that went idle last; blocking calls still run side by side."""

from __future__ import annotations

import threading
import time

import pytest

from mserve.transport.recent_pool import RecentFirstPool


def test_calls_one_after_another_run_on_one_thread():
    pool = RecentFirstPool(8, "t")
    try:
        names = {pool.submit(lambda: threading.current_thread().name).result(timeout=5) for _ in range(50)}
        assert names == {"t-0"}
    finally:
        pool.shutdown()


def test_blocking_calls_get_threads_up_to_the_limit_and_the_rest_wait_in_order():
    pool = RecentFirstPool(3, "t")
    release = threading.Event()
    running = []
    lock = threading.Lock()

    def blocked(i):
        with lock:
            running.append(i)
        release.wait(5)
        return i

    try:
        calls = [pool.submit(blocked, i) for i in range(5)]
        deadline = time.monotonic() + 5
        while len(running) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert sorted(running) == [0, 1, 2]  # three threads, the other two calls wait
        release.set()
        assert [c.result(timeout=5) for c in calls] == [0, 1, 2, 3, 4]
        assert running[3:] == [3, 4]  # waiting calls run in arrival order
        names = {t.name for t in threading.enumerate() if t.name.startswith("t-")}
        assert names == {"t-0", "t-1", "t-2"}
    finally:
        pool.shutdown()


def test_an_exception_reaches_the_future_and_the_thread_serves_on():
    pool = RecentFirstPool(2, "t")
    try:
        failing = pool.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(timeout=5)
        assert pool.submit(lambda: 42).result(timeout=5) == 42
    finally:
        pool.shutdown()


def test_shutdown_ends_idle_threads_and_refuses_new_calls():
    pool = RecentFirstPool(2, "ended")
    pool.submit(lambda: None).result(timeout=5)
    pool.shutdown()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("ended-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith("ended-") for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
    with pytest.raises(ValueError):
        RecentFirstPool(0, "x")
