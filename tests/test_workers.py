"""Several worker processes on one port (`mserve start --workers N`)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import pytest
import requests

from mserve import server
from mserve.transport.balance import ConnectionBalance
from mserve.transport.http import bind_socket
from mserve.transport.workers import WorkerPool
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
        while time.monotonic() < deadline and pool.restarts < 1:  # the replacement serves
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


WHOAMI_CONFIG = """
import os
from mserve import register

def pid(x):
    return os.getpid()

@register.register_method(output_names=["pid"])
def who(x):
    y = register.add_stage(pid, x, outputs_count=1)
    return y
"""


def _pids_of_keepalive_connections(port: int, count: int) -> list[int]:
    """Open ``count`` keep-alive connections at the same moment (as wrk and
    connection pools do), send one request on each, and say which worker served it."""
    barrier = threading.Barrier(count)
    pids: list[int] = [0] * count
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(count)]

    def one(i: int) -> None:
        barrier.wait()
        conns[i].request("POST", "/model/whoami:who", body=b'{"instances": [{"x": 1}]}')
        pids[i] = json.loads(conns[i].getresponse().read())["instances"][0]["pid"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A second request on each connection stays with the worker that accepted it.
    for i, conn in enumerate(conns):
        conn.request("POST", "/model/whoami:who", body=b'{"instances": [{"x": 1}]}')
        assert json.loads(conn.getresponse().read())["instances"][0]["pid"] == pids[i]
    for conn in conns:
        conn.close()
    return pids


@pytest.fixture
def whoami_pool(tmp_path):
    """Two workers serving ``whoami`` (which answers its process id); yields (pool, port)."""
    write_servable(tmp_path, "whoami", WHOAMI_CONFIG)
    (tmp_path / "whoami" / "1").mkdir()
    sock = bind_socket("127.0.0.1", 0)
    pool = WorkerPool([server.ServableStartConfig(tmp_path, "whoami")], sock, workers=2)
    pool.start()
    try:
        yield pool, sock.getsockname()[1]
    finally:
        pool.stop(drain_timeout=5)


def test_keepalive_connections_spread_evenly_over_workers(whoami_pool):
    pool, port = whoami_pool
    workers = {p.pid for p in pool.procs}
    for _ in range(3):
        pids = _pids_of_keepalive_connections(port, 4)
        assert set(pids) == workers
        assert sorted(pids.count(pid) for pid in workers) == [2, 2], pids
        time.sleep(0.3)  # the closed connections leave both workers' counts


def test_balance_table_prefers_the_least_loaded_live_worker():
    fd = ConnectionBalance.create_table(3)
    try:
        a, b, c = (ConnectionBalance(fd, 3, i) for i in range(3))
        # c has never published: it is loading (or dead) and left out.
        assert a.may_accept(0) and b.may_accept(0)
        assert not a.may_accept(1)  # b holds 0
        assert b.may_accept(1)  # ties accept
        assert c.may_accept(5) is False  # live a and b hold fewer
        assert a.may_accept(1)
        b.close()  # gone: a is compared with c alone
        assert a.may_accept(4)
        b = ConnectionBalance(fd, 3, 1)  # b's replacement: out of the comparison until it serves
        assert a.may_accept(4)
        assert b.may_accept(0)  # serving now, with no connections
        assert not a.may_accept(4)
        ConnectionBalance.forget(fd, 3, 1)  # the pool saw b die
        assert a.may_accept(4)
        b.close()
        with pytest.raises(ValueError):
            ConnectionBalance(fd, 3, 3)
    finally:
        os.close(fd)


def test_a_dead_worker_does_not_hold_up_new_connections(whoami_pool):
    """The survivor holds a connection; the dead worker's last entry in the balance
    table (no connections, a recent heartbeat) must not keep it declining new ones
    until the heartbeat ages (3 s): the pool takes the dead worker out at once."""
    pool, port = whoami_pool
    held = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    held.request("POST", "/model/whoami:who", body=b'{"instances": [{"x": 1}]}')
    survivor = json.loads(held.getresponse().read())["instances"][0]["pid"]
    victim = next(p for p in pool.procs if p.pid != survivor)
    time.sleep(0.2)  # both workers have published since
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    started = time.monotonic()
    r = requests.post(f"http://127.0.0.1:{port}/model/whoami:who", json={"instances": [{"x": 1}]}, timeout=10)
    waited = time.monotonic() - started
    assert r.json()["instances"][0]["pid"] == survivor
    assert waited < 1.5, f"a new connection waited {waited:.2f}s for the survivor"
    held.close()


def test_frontends_serve_health_while_the_device_processes_load(tmp_path):
    """Front-ends (a pool with a manifest) listen at once: /health 200, /ready 503 and
    predicts 503 until the device processes publish what they serve."""
    from mserve.devices.supervisor import DeviceSupervisor

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    pool = WorkerPool([], sock, workers=2, manifest=tmp_path / "manifest.json")
    supervisor = DeviceSupervisor([server.ServableStartConfig(BUNDLED, "add")], tmp_path)
    try:
        assert pool.start(loaded=False) == []
        assert requests.get(base + "/health", timeout=10).status_code == 200
        ready = requests.get(base + "/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "loading servables"
        early = requests.post(base + "/model/add:add_common", json=ADD_BODY, timeout=10)
        assert early.status_code == 503 and "still loading" in early.json()["error_msg"]

        supervisor.start()
        described = pool.wait_loaded()
        assert [s["name"] for s in described] == ["add"]
        assert requests.get(base + "/ready", timeout=10).status_code == 200
        assert all(_post(port) == EXPECTED for _ in range(6))
    finally:
        pool.stop(drain_timeout=5)
        supervisor.stop(drain_timeout=5)
