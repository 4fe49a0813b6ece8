"""Faults and floods, observed from outside: graceful stop, front-end crashes,
connection floods, gRPC limits, big and hostile requests.

Servers here are real ``mserve start`` subprocesses on free ports of 127.0.0.1 (the
default architecture: front-end processes and a device process); requests go over
real sockets. Floods use small numbers under a lowered descriptor limit.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import requests

from support import MserveStart, child_processes, export_to, free_port, spec, write_servable

pytestmark = pytest.mark.timeout(300)

SLOW_CONFIG = """
import os
import time

from mserve import register

if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow-load")):
    time.sleep(3)  # a process loading this servable now (a replacement front-end) takes a while

model = register.declare_model(model_file="affine.jaxexport", model_format="jax_export", with_batch_dim=True)


def hold(seconds):
    time.sleep(float(seconds))
    return seconds


@register.register_method(output_names=["held"])
def wait(seconds):
    return register.add_stage(hold, seconds, outputs_count=1)


@register.register_method(output_names=["y"])
def affine(x):
    return register.add_stage(model, x, outputs_count=1)
"""


AFFINE = {"instances": [{"x": [1.0, 2.0, 3.0, 4.0]}]}  # a predict of slow:affine


def write_slow(root: Path) -> Path:
    write_servable(root, "slow", SLOW_CONFIG)
    export_to(root / "slow" / "1" / "affine.jaxexport", lambda x: x * 2.0 + 1.0, spec("b, 4"))
    return root


class Served(MserveStart):
    """``mserve start ROOT ... --port P`` run in ``ROOT``, its output in a file there;
    ``env={"MSERVE_TEST_NOFILE": "N"}`` lowers its descriptor limit (as a default
    ``ulimit -n`` of 1024 would)."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None):
        env = dict(env or {})
        nofile = int(env.pop("MSERVE_TEST_NOFILE", 0))

        def lower_descriptor_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        # Only when asked: a preexec_fn makes subprocess fork this test process (not vfork), and
        # in that child, before the exec, grpcio's fork handlers (this process holds gRPC channels
        # from other tests) can abort on the descriptors subprocess closes ("Epoll1Poller
        # encountered epoll_wait error: Bad file descriptor"), so the server never starts.
        super().__init__([str(root), *args], root, env=env, cwd=root,
                         preexec_fn=lower_descriptor_limit if nofile else None)


def raw_post(port: int, path: str, body: dict, timeout: float = 30) -> tuple[str, int | None]:
    """One request on a fresh connection: ("ok", status), ("refused", None), or
    ("lost", None) when the connection was reset or closed without a reply."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return "ok", conn.getresponse().status
    except ConnectionRefusedError:
        return "refused", None
    except (ConnectionError, http.client.HTTPException, socket.timeout, OSError):
        return "lost", None
    finally:
        conn.close()


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def slow_root(tmp_path_factory):
    return write_slow(tmp_path_factory.mktemp("slow"))


# --------------------------------------------------------------------------- graceful stop


def test_stop_finishes_every_received_request_and_refuses_new_ones(slow_root):
    drain = 4.0
    served = Served(slow_root, "--workers", "2", "--threads", "2", "--drain-timeout", str(drain))
    try:
        served.wait_ready()
        # 12 requests of 0.5 s on 2 front-ends of 2 threads: 4 run, 8 wait for a thread.
        results: list[tuple[str, int | None]] = []
        lock = threading.Lock()

        def one() -> None:
            outcome = raw_post(served.port, "/model/slow:wait", {"instances": [{"seconds": 0.5}]})
            with lock:
                results.append(outcome)

        inflight = [threading.Thread(target=one) for _ in range(12)]
        for t in inflight:
            t.start()
        time.sleep(0.5)  # every request is received
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        newcomers: list[tuple[str, int | None]] = []
        time.sleep(0.3)
        while served.proc.poll() is None and time.monotonic() - started < drain + 10:
            newcomers.append(raw_post(served.port, "/model/slow:wait", {"instances": [{"seconds": 0}]}, timeout=15))
            time.sleep(0.1)
        served.proc.wait(drain + 15)
        took = time.monotonic() - started
        for t in inflight:
            t.join(30)
        assert results == [("ok", 200)] * 12, served.output()
        assert newcomers and all(o in (("refused", None), ("ok", 503), ("ok", 200)) for o in newcomers), newcomers
        assert took < drain + 1.5, f"the stop took {took:.1f}s with --drain-timeout {drain:g}\n" + served.output()
        assert served.proc.returncode == 0, served.output()
    finally:
        served.stop()


def test_a_connection_opened_before_the_stop_gets_its_request_answered(slow_root):
    # A client that connected just before the stop (the kernel accepted it) and sends
    # its request a moment later must get an answer, even when nothing else is in
    # flight: the drain waits for it instead of ending as soon as no request is open.
    served = Served(slow_root, "--workers", "1", "--drain-timeout", "5")
    try:
        served.wait_ready()
        body = json.dumps(AFFINE).encode()
        sock = socket.create_connection(("127.0.0.1", served.port), timeout=15)
        time.sleep(0.3)  # the front-end has taken the connection, nothing sent yet
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(0.4)  # the stop has begun
        sock.sendall(b"POST /model/slow:affine HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.1 ") else b"(no reply)"
        assert status in (b"200", b"503"), f"{reply[:300]!r}\n" + served.output()
        assert served.proc.wait(15) == 0, served.output()
    finally:
        served.stop()


def blocked_signals(pid: int) -> dict[int, int]:
    """Each thread of ``pid``: its blocked-signal mask (from /proc)."""
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("SigBlk:"):
                masks[int(tid)] = int(line.split()[1], 16)
    return masks


def test_stop_signals_reach_only_the_thread_that_waits_for_them(slow_root):
    # Front-end and device processes wait for their stop signals in the main thread.
    # A thread that does not block them (OpenBLAS's pool starts when numpy loads)
    # takes one that comes while the main thread is busy and dies of its default
    # action, with the requests in flight: every thread must block them.
    served = Served(slow_root, "--workers", "1")
    try:
        served.wait_ready()
        bit = {sig: 1 << (sig - 1) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        (frontend,) = frontends(served.proc.pid)
        (device,) = device_processes(served.proc.pid)
        for pid, signals in ((frontend, (signal.SIGTERM, signal.SIGUSR1)), (device, (signal.SIGTERM, signal.SIGINT))):
            masks = blocked_signals(pid)
            assert len(masks) > 1, masks
            for sig in signals:
                # (the main thread shows them unblocked while it waits in sigwait)
                unblocked = [tid for tid, mask in masks.items() if tid != pid and not mask & bit[sig]]
                assert not unblocked, f"{sig.name} unblocked in threads {unblocked} of process {pid}"
        # A burst of "begin shutdown" signals while the front-end handles the first: it
        # stays up and answers (/ready 503: shutting down), and the stop is clean.
        for _ in range(20):
            os.kill(frontend, signal.SIGUSR1)
        time.sleep(0.5)
        assert served.proc.poll() is None and frontend in frontends(served.proc.pid), served.output()
        assert requests.get(served.url + "/ready", timeout=10).status_code == 503
        assert requests.post(served.url + "/model/slow:affine", json=AFFINE,
                             timeout=10).json() == {"instances": [{"y": [3.0, 5.0, 7.0, 9.0]}]}
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0, served.output()
        assert "exited with code" not in served.output(), served.output()
    finally:
        served.stop()


def grpc_wait_request(seconds: float):
    import numpy as np

    from mserve.protocol import ms_service_pb2 as pb

    req = pb.PredictRequest()
    req.servable_spec.name, req.servable_spec.method_name = "slow", "wait"
    value = np.array(seconds, np.float32)
    req.instances.add().items["seconds"].CopyFrom(pb.Tensor(dtype=pb.MS_FLOAT32, data=value.tobytes()))
    return req


def grpc_outcome(port: int, seconds: float, timeout: float = 30) -> str:
    """One Predict on a channel of its own: "ok", "error_msg: ..." or the gRPC status name."""
    import grpc

    from mserve.protocol import ms_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = pb_grpc.MSServiceStub(channel).Predict(grpc_wait_request(seconds), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return f"error_msg: {reply.error_msg[0].error_msg}" if reply.error_msg else "ok"


def test_grpc_stop_finishes_every_received_call(slow_root):
    drain = 4.0
    grpc_port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = min(1024, hard)
    served = Served(slow_root, "--workers", "2", "--threads", "2", "--drain-timeout", str(drain),
                    "--grpc-port", str(grpc_port), env={"MSERVE_TEST_NOFILE": str(low)})
    try:
        served.wait_ready()
        assert grpc_outcome(grpc_port, 0) == "ok"
        if hard > low + 2000:  # gRPC's front-ends raise their descriptor limit as REST's do
            limits = [soft_fd_limit(child) for child in frontends(served.proc.pid)]
            assert len(limits) == 4 and min(limits) > low, limits
        results: list[str] = []
        lock = threading.Lock()

        def one() -> None:
            outcome = grpc_outcome(grpc_port, 1.0)
            with lock:
                results.append(outcome)

        inflight = [threading.Thread(target=one) for _ in range(8)]
        for t in inflight:
            t.start()
        time.sleep(1.0)  # every call is received
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        newcomers: list[str] = []
        time.sleep(0.3)
        while served.proc.poll() is None and time.monotonic() - started < drain + 10:
            newcomers.append(grpc_outcome(grpc_port, 0, timeout=15))
            time.sleep(0.1)
        served.proc.wait(drain + 15)
        took = time.monotonic() - started
        for t in inflight:
            t.join(30)
        assert results == ["ok"] * 8, results
        assert all(o in ("ok", "UNAVAILABLE") for o in newcomers), newcomers
        assert took < drain + 1.5, f"the stop took {took:.1f}s with --drain-timeout {drain:g}\n" + served.output()
        assert served.proc.returncode == 0, served.output()
    finally:
        served.stop()


# --------------------------------------------------------------------------- readiness


def frontends(pid: int) -> list[int]:
    """The REST front-end processes of the server whose main process is ``pid``."""
    return child_processes(pid, "mserve.runtime.frontend_role")


def get_status(url: str) -> int | str:
    try:
        return requests.get(url, timeout=10, headers={"Connection": "close"}).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def statuses_while_a_frontend_is_replaced(
    served: Served, marker: Path, seconds: float, ready: Callable[[], int | str], predict: Callable[[], int | str],
) -> list[int | str]:
    """kill -9 of one front-end (its replacement loads slowly: ``marker``), then what
    ``ready()`` and ``predict()`` answer for ``seconds`` while the replacement loads."""
    marker.touch()
    os.kill(frontends(served.proc.pid)[0], signal.SIGKILL)
    seen: list[int | str] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        seen.append(ready())
        seen.append(predict())
        time.sleep(0.05)
    assert "exited with code -9" in served.output(), served.output()
    return seen


def test_readiness_is_one_answer_and_a_crashed_frontend_takes_no_clients(slow_root):
    marker = slow_root / "slow" / "slow-load"
    served = Served(slow_root, "--workers", "2")
    try:
        # Start-up: once /ready has said 200, it keeps saying so (whichever front-end answers).
        deadline = time.monotonic() + 120
        while get_status(served.url + "/ready") != 200:
            assert served.proc.poll() is None and time.monotonic() < deadline, served.output()
            time.sleep(0.05)
        after_first = [get_status(served.url + "/ready") for _ in range(40)]
        assert after_first == [200] * 40, after_first
        served.wait_ready()

        # kill -9 of one front-end: its replacement loads, and takes no client meanwhile.
        def ready() -> int | str:
            return get_status(served.url + "/ready")

        def predict() -> int | str:
            reply = raw_post(served.port, "/model/slow:affine", AFFINE)
            return reply[1] if reply[0] == "ok" else reply[0]

        seen = statuses_while_a_frontend_is_replaced(served, marker, 10, ready, predict)
        assert set(seen) == {200}, [s for s in seen if s != 200]
    finally:
        marker.unlink(missing_ok=True)
        served.stop()


def test_over_https_a_crashed_frontend_takes_no_clients_while_its_replacement_loads(slow_root, tmp_path):
    # As over plain HTTP: front-ends take turns accepting, and one still loading
    # (the replacement of a killed one) declines its turns, so no client meets its 503.
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    issued.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    marker = slow_root / "slow" / "slow-load"
    served = Served(slow_root, "--workers", "2", "--ssl-certfile", str(tmp_path / "server.crt"),
                    "--ssl-keyfile", str(tmp_path / "server.key"))
    url = f"https://127.0.0.1:{served.port}"
    verify = str(tmp_path / "ca.crt")

    def status(method: str, path: str, **kwargs) -> int | str:
        try:
            return requests.request(method, url + path, timeout=10, verify=verify, headers={"Connection": "close"},
                                    **kwargs).status_code
        except requests.RequestException as exc:
            return type(exc).__name__

    try:
        deadline = time.monotonic() + 120
        while status("GET", "/ready") != 200 or "serving on" not in served.output():
            assert served.proc.poll() is None and time.monotonic() < deadline, served.output()
            time.sleep(0.1)
        seen = statuses_while_a_frontend_is_replaced(
            served, marker, 8, lambda: status("GET", "/ready"), lambda: status("POST", "/model/slow:affine", json=AFFINE))
        assert set(seen) == {200}, [s for s in seen if s != 200]
    finally:
        marker.unlink(missing_ok=True)
        served.stop()


# --------------------------------------------------------------------------- floods


def test_a_fresh_client_is_answered_while_a_connection_flood_is_accepted(slow_root):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 2048), hard), hard))
    served = Served(slow_root, "--workers", "2")
    held: list[socket.socket] = []
    try:
        served.wait_ready()
        waits: list[float] = []
        for _ in range(2):
            for _ in range(800):  # a burst of idle connections, then a fresh client right behind them
                held.append(socket.create_connection(("127.0.0.1", served.port), timeout=10))
            started = time.monotonic()
            reply = raw_post(served.port, "/model/slow:affine", AFFINE)
            waits.append(time.monotonic() - started)
            assert reply == ("ok", 200)
        # Front-ends taking turns one connection at a time made this client wait many
        # seconds behind the burst; accepted at the kernel's pace it waits a fraction of one.
        assert max(waits) < 3.0, waits
    finally:
        for s in held:
            s.close()
        served.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --------------------------------------------------------------------------- gRPC limits


def soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no descriptor limit")


def test_grpc_limits_connections_and_idle_time_with_a_raised_descriptor_limit(slow_root):
    import grpc

    from mserve.protocol import ms_service_pb2_grpc as pb_grpc

    grpc_port = free_port()
    served = Served(slow_root, "--workers", "1", "--grpc-port", str(grpc_port), "--max-connections", "8",
                    "--idle-timeout", "1")
    channels = []
    try:
        served.wait_ready()
        assert grpc_outcome(grpc_port, 0) == "ok"

        # An idle connection is closed: a raw HTTP/2 client that sends nothing after its settings.
        raw = socket.create_connection(("127.0.0.1", grpc_port), timeout=15)
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        received = b""
        while True:
            data = raw.recv(65536)  # GOAWAY, then the close; a timeout fails the test
            if not data:
                break
            received += data
        raw.close()
        assert b"\x07" in received  # a GOAWAY frame (type 7) came before the close

        # Beyond max_connections, new connections are refused, with a log line.
        outcomes = []
        for _ in range(20):
            # a connection of its own (channels alike share one by default)
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            try:
                pb_grpc.MSServiceStub(channel).Predict(grpc_wait_request(0), timeout=5)
                outcomes.append("ok")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)
        assert "ok" in outcomes and set(outcomes) - {"ok"}, outcomes
        deadline = time.monotonic() + 15
        while "gRPC limit reached" not in served.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "gRPC limit reached" in served.output(), served.output()[-3000:]
        for channel in channels:
            channel.close()
        channels.clear()
        time.sleep(1.5)
        assert grpc_outcome(grpc_port, 0) == "ok"  # the limit frees up as clients leave
    finally:
        for channel in channels:
            channel.close()
        served.stop()


# --------------------------------------------------------------------------- run directory


def run_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "mserve-*")))


def owner(path: str) -> int | None:
    try:
        return int(Path(path, "owner").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_the_run_directory_of_a_killed_server_is_removed_by_the_next_start(slow_root):
    before = run_dirs()
    first = Served(slow_root, "--workers", "1")
    try:
        first.wait_ready()
        mine = {d for d in run_dirs() - before if owner(d) == first.proc.pid}  # other servers may run too
        assert mine, "no run directory"
        left = frontends(first.proc.pid) + device_processes(first.proc.pid)
        assert len(left) == 2, left
        first.proc.kill()  # kill -9: no stop, no cleanup; its children follow it
        first.proc.wait()
    finally:
        first.stop()
    deadline = time.monotonic() + 10
    while (left := [pid for pid in left if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the killed server still running: {left}"  # none orphaned
    assert mine <= run_dirs()  # still there
    second = Served(slow_root, "--workers", "1")
    try:
        second.wait_ready()
        assert not mine & run_dirs(), mine
    finally:
        second.stop()


# --------------------------------------------------------------------------- device watchdog


def device_processes(pid: int) -> list[int]:
    return child_processes(pid, "mserve.runtime.device_role")


def test_a_stopped_device_process_is_detected_and_restarted(slow_root):
    served = Served(slow_root, "--workers", "1", env={"MSERVE_DEVICE_HANG_TIMEOUT": "3"})
    try:
        served.wait_ready()
        [device] = device_processes(served.proc.pid)
        os.kill(device, signal.SIGSTOP)
        started = time.monotonic()
        # A call waiting on the stopped process is answered once the watchdog acts, not
        # after the request timeout (100 s).
        outcome = raw_post(served.port, "/model/slow:affine", AFFINE, timeout=60)
        assert outcome[0] == "ok" and time.monotonic() - started < 30, outcome
        deadline = time.monotonic() + 90
        while "serves again" not in served.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        out = served.output()
        assert "has not reported for" in out and "marking it down and restarting it" in out, out[-3000:]
        assert "serves again" in out, out[-3000:]
        assert device not in device_processes(served.proc.pid)
        assert raw_post(served.port, "/model/slow:affine", AFFINE) == ("ok", 200)
    finally:
        for pid in device_processes(served.proc.pid):
            os.kill(pid, signal.SIGCONT)
        served.stop()
