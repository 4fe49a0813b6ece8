"""Several worker processes on one port (`mserve start --workers N`)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from mserve import server
from mserve.transport import bind_socket
from mserve.workers import WorkerPool
from support import ADD_BODY, BUNDLED, write_servable

EXPECTED = {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}


def _post(port: int) -> dict:
    # A new connection each time, so the kernel hands requests to either worker.
    r = requests.post(f"http://127.0.0.1:{port}/model/add:add_common", json=ADD_BODY,
                      headers={"Connection": "close"}, timeout=10)
    return r.json()


def test_workers_share_the_port_and_a_dead_worker_is_replaced():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    pool = WorkerPool([server.ServableStartConfig(BUNDLED, "add")], sock, workers=2)
    described = pool.start()
    try:
        assert [s["name"] for s in described] == ["add"]
        assert all(_post(port) == EXPECTED for _ in range(20))

        victim = pool.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        # The other worker keeps serving while the pool starts a replacement.
        assert all(_post(port) == EXPECTED for _ in range(10))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (pool.procs[0] is victim or pool.procs[0].poll() is not None):
            time.sleep(0.2)
        assert pool.procs[0] is not victim and pool.procs[0].poll() is None
        assert all(_post(port) == EXPECTED for _ in range(10))
    finally:
        procs = list(pool.procs)
        pool.stop(drain_timeout=5)
    assert [p.returncode for p in procs] == [0, 0]


def test_a_worker_that_cannot_load_fails_the_start(tmp_path):
    write_servable(tmp_path, "broken", "raise ValueError('no model for you')\n", {"1/x": b""})
    sock = bind_socket("127.0.0.1", 0)
    pool = WorkerPool([server.ServableStartConfig(tmp_path, "broken")], sock, workers=2)
    with pytest.raises(RuntimeError, match="no model for you"):
        pool.start()
    assert all(p is None or p.poll() is not None for p in pool.procs)
