"""Device processes and front-ends (mserve.devices): observed from outside.

Servers here are real ``mserve start`` subprocesses (or a start script) on a free
port: the process tree is read from /proc, what serves a model from ``/model/{name}``
and ``/metrics``, and requests go over HTTP.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import requests

from mserve.devices.channel import Channel, ChannelClosed
from mserve.devices.shm import Buffer
from mserve.devices.supervisor import DeviceGroup, device_env, plan_groups
from mserve import server
from support import (
    MserveStart, child_processes, export_to, free_port, spec, write_matmul_subgraphs, write_servable,
)

pytestmark = pytest.mark.timeout(300)

MIXER_CONFIG = """
import os
import time

from mserve import register

model = register.declare_model(model_file="affine.jaxexport", model_format="jax_export", with_batch_dim=True)


def nap(x):
    time.sleep(0.5)  # every request has announced its row by the time the first one submits
    return x, os.getpid()


def tag(x):
    return x, os.getpid()


@register.register_method(output_names=["y", "frontend"])
def slow(x):
    x, pid = register.add_stage(nap, x, outputs_count=2)
    y = register.add_stage(model, x, outputs_count=1)
    return y, pid


@register.register_method(output_names=["y", "frontend"])
def fast(x):
    x, pid = register.add_stage(tag, x, outputs_count=2)
    y = register.add_stage(model, x, outputs_count=1)
    return y, pid


tiler = register.declare_model(model_file="tile.jaxexport", model_format="jax_export", with_batch_dim=False)


@register.register_method(output_names=["y"])
def big(x):
    return register.add_stage(tiler, x, outputs_count=1)


def hold(seconds):
    time.sleep(float(seconds))
    return seconds


@register.register_method(output_names=["held"])
def wait(seconds):
    return register.add_stage(hold, seconds, outputs_count=1)
"""


def write_mixer(root: Path) -> None:
    write_servable(root, "mixer", MIXER_CONFIG)
    export_to(root / "mixer" / "1" / "affine.jaxexport", lambda x: x * 2.0 + 1.0, spec("b, 4"))
    # 4 floats in, 3 MiB out: more than a connection's first shared-memory buffer holds
    export_to(root / "mixer" / "1" / "tile.jaxexport", lambda x: jnp.tile(x, BIG_TILES), spec((4,)))


BIG_TILES = 3 * 1024 * 1024 // 16


# --------------------------------------------------------------------------- process tree


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree(pid: int) -> dict[str, list[int]]:
    """The server's processes by role."""
    roles: dict[str, list[int]] = {"frontend": [], "device": []}
    for child in child_processes(pid):
        line = cmdline(child)
        if "mserve.runtime.device_role" in line:
            roles["device"].append(child)
        elif "mserve.runtime.frontend_role" in line:
            roles["frontend"].append(child)
    return roles


def maps_jax(pid: int) -> bool:
    """Whether the process has XLA's runtime (jaxlib) mapped: only a process that
    imported JAX, which a process holding a compiled model must have."""
    return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()


class Served(MserveStart):
    """``mserve start ARGS --port P`` as a subprocess, its output in ``cwd`` (else /tmp)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None):
        super().__init__(args, cwd or Path("/tmp"), env=env)


def post(url: str, path: str, body: dict, session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(url + path, json=body, timeout=30)


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            labels = {}
            if "{" in head:
                for part in head[head.index("{") + 1 : -1].split(","):
                    k, v = part.split("=", 1)
                    labels[k] = v.strip('"')
            out.append((labels, float(value)))
    return out


@pytest.fixture(scope="module")
def three_frontends(tmp_path_factory):
    """``mserve start --workers 3`` serving the mixer servable on one (CPU) device."""
    root = tmp_path_factory.mktemp("mixer")
    write_mixer(root)
    # No front-end copies: the small unbatched tile model runs in the device process too.
    served = Served([str(root), "--workers", "3", "--max-batch-delay-ms", "3000", "--frontend-copy-max-kb", "0"],
                    cwd=root)
    try:
        served.wait_ready()
        yield served
    finally:
        code = served.stop()
        assert code == 0, served.output()


def _concurrent_keepalive(url: str, path: str, bodies: list[dict]) -> list[dict]:
    """One keep-alive connection per body, opened at the same moment (the front-ends
    spread them, one each), each sending its body once."""
    host, port = url.rsplit("//", 1)[1].split(":")
    barrier = threading.Barrier(len(bodies))
    replies: list = [None] * len(bodies)

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.connect()
        barrier.wait()
        conn.request("POST", path, body=json.dumps(bodies[i]), headers={"Content-Type": "application/json"})
        replies[i] = json.loads(conn.getresponse().read())
        conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies


def test_one_device_process_holds_the_model_for_three_frontends(three_frontends):
    roles = tree(three_frontends.proc.pid)
    assert len(roles["frontend"]) == 3 and len(roles["device"]) == 1, roles
    device = roles["device"][0]
    described = requests.get(three_frontends.url + "/model/mixer", timeout=10).json()
    for model in described["versions"][0]["models"]:
        assert model["placement"] == [{"device": "cpu:0", "pid": device, "role": "device process"}]
    # Only the device process has XLA loaded: the front-ends never imported JAX.
    assert maps_jax(device)
    assert not any(maps_jax(pid) for pid in roles["frontend"])
    metrics = requests.get(three_frontends.url + "/metrics", timeout=10).text
    placed = metric_samples(metrics, "mserve_model_placement")
    assert [(s["process"], s["device"], v) for s, v in placed if s["servable"] == "mixer"] == [(str(device), "cpu:0", 1.0)] * 2


def test_requests_on_different_frontends_share_one_device_call(three_frontends):
    url = three_frontends.url

    def over_two() -> float:  # device calls whose rows came from 3 or more front-ends
        samples = metric_samples(requests.get(url + "/metrics", timeout=10).text, "mserve_batch_frontends_bucket")
        count = {s["le"]: v for s, v in samples if s.get("servable") == "mixer"}
        return count.get("+Inf", 0.0) - count.get("2.0", 0.0)

    everyone = set(tree(three_frontends.proc.pid)["frontend"])
    bodies = [{"instances": [{"x": [float(i), 1.0, 2.0, 3.0]}]} for i in range(3)]
    for _ in range(10):  # until the three connections land on three front-ends
        before = over_two()
        replies = _concurrent_keepalive(url, "/model/mixer:slow", bodies)
        for i, reply in enumerate(replies):
            assert reply["instances"][0]["y"] == [2.0 * i + 1.0, 3.0, 5.0, 7.0]
        if {r["instances"][0]["frontend"] for r in replies} == everyone:
            break
    else:
        pytest.fail("three connections opened at once never spread over the three front-ends")
    assert over_two() - before == 1


def test_results_never_mix_across_frontends(three_frontends):
    url = three_frontends.url
    errors: list = []
    seen_frontends: set = set()

    def client(k: int) -> None:
        session = requests.Session()
        rng = np.random.default_rng(k)
        for _ in range(25):
            n = int(rng.integers(1, 4))
            x = rng.standard_normal((n, 4)).astype(np.float32)
            reply = post(url, "/model/mixer:fast", {"instances": [{"x": row.tolist()} for row in x]}, session)
            if reply.status_code != 200:
                errors.append(reply.text)
                continue
            got = reply.json()["instances"]
            seen_frontends.update(inst["frontend"] for inst in got)
            y = np.array([inst["y"] for inst in got], np.float32)
            if not np.array_equal(y, x * np.float32(2.0) + np.float32(1.0)):
                errors.append((x.tolist(), y.tolist()))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen_frontends) >= 2


def _connections_and_owners(port: int, count: int) -> tuple[list, list]:
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(count)]
    for conn in conns:
        conn.connect()
    owners = []
    for conn in conns:
        conn.request("POST", "/model/mixer:fast", body=json.dumps({"instances": [{"x": [0.0, 0.0, 0.0, 0.0]}]}))
        owners.append(json.loads(conn.getresponse().read())["instances"][0]["frontend"])
    return conns, owners


def test_outputs_larger_than_the_shared_buffer(three_frontends):
    """3 MiB of output for 16 bytes of input: the first reply carries it inline (the
    connection's buffer holds 1 MiB), later ones through the grown buffer."""
    session = requests.Session()
    for k in range(3):
        x = [float(k), 1.5, -2.0, 4.0]
        reply = post(three_frontends.url, "/model/mixer:big", {"instances": [{"x": x}]}, session)
        assert reply.status_code == 200, reply.text[:200]
        y = np.array(reply.json()["instances"][0]["y"], np.float32)
        assert y.shape == (4 * BIG_TILES,) and np.array_equal(y, np.tile(np.array(x, np.float32), BIG_TILES))


def test_a_killed_frontend_loses_only_its_requests(three_frontends):
    url = three_frontends.url
    roles = tree(three_frontends.proc.pid)
    # Two slow requests on two front-ends (connections opened at once spread out).
    for _ in range(10):  # until the three connections land on three front-ends
        conns, owners = _connections_and_owners(three_frontends.port, 3)
        if len(set(owners)) == 3:
            break
        for conn in conns:
            conn.close()
        time.sleep(0.3)
    assert len(set(owners)) == 3, owners
    victim, survivor = conns[0], conns[1]
    for conn in (victim, survivor):
        conn.request("POST", "/model/mixer:wait", body=json.dumps({"instances": [{"seconds": 2.0}]}))
    time.sleep(0.5)  # both are in their Python stage now
    os.kill(owners[0], signal.SIGKILL)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        victim.getresponse().read()
    assert json.loads(survivor.getresponse().read()) == {"instances": [{"held": 2.0}]}
    for conn in conns:
        conn.close()
    # The pool replaces the front-end; the device process is untouched.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = tree(three_frontends.proc.pid)
        if len(now["frontend"]) == 3 and owners[0] not in now["frontend"]:
            break
        time.sleep(0.2)
    assert len(now["frontend"]) == 3 and owners[0] not in now["frontend"], now
    assert now["device"] == roles["device"]
    assert post(url, "/model/mixer:fast", {"instances": [{"x": [1.0, 1.0, 1.0, 1.0]}]}).status_code == 200


def test_a_killed_device_process_fails_fast_then_serves_again(three_frontends):
    url = three_frontends.url
    roles = tree(three_frontends.proc.pid)
    (device,) = roles["device"]
    body = {"instances": [{"x": [1.0, 2.0, 3.0, 4.0]}]}
    assert post(url, "/model/mixer:fast", body).status_code == 200
    os.kill(device, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reply = post(url, "/model/mixer:fast", body)  # 30 s client timeout: a hang fails the test
        statuses.append(reply.status_code)
        if reply.status_code == 200:
            break
        assert reply.status_code == 503, reply.text
        assert reply.headers.get("Retry-After") == "1"
        assert "device process" in reply.json()["error_msg"], reply.text
        time.sleep(0.05)
    assert 503 in statuses and statuses[-1] == 200, statuses
    assert reply.json()["instances"][0]["y"] == [3.0, 5.0, 7.0, 9.0]
    now = tree(three_frontends.proc.pid)
    assert len(now["device"]) == 1 and now["device"] != [device]
    assert sorted(now["frontend"]) == sorted(roles["frontend"])  # no front-end was restarted
    # Front-ends learn the new pid from the manifest (it serves a moment before that).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        described = requests.get(url + "/model/mixer", timeout=10).json()
        if described["versions"][0]["models"][0]["placement"][0]["pid"] == now["device"][0]:
            break
        time.sleep(0.1)
    assert described["versions"][0]["models"][0]["placement"][0]["pid"] == now["device"][0]


def test_small_cpu_models_get_a_copy_in_each_frontend(tmp_path):
    """The bundled add (1 KiB, not batched) runs in the front-ends too; with
    --frontend-copy-max-kb 0 only the device process holds it and no front-end
    imports JAX."""
    for limit, copies in (("256", True), ("0", False)):
        served = Served(["--servable", "add", "--workers", "2", "--frontend-copy-max-kb", limit], cwd=tmp_path)
        try:
            served.wait_ready()
            roles = tree(served.proc.pid)
            session = requests.Session()
            reply = post(served.url, "/model/add:add_common", {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]],
                                                                             "x2": [[1.0, 2.0], [3.0, 4.0]]}]}, session)
            assert reply.json() == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
            (model,) = session.get(served.url + "/model/add", timeout=10).json()["versions"][0]["models"]
            where = [(p["role"], p["pid"]) for p in model["placement"]]
            assert where[0] == ("device process", roles["device"][0])
            if copies:
                assert len(where) == 2 and where[1][0] == "front-end copy" and where[1][1] in roles["frontend"]
                assert all(maps_jax(pid) for pid in roles["frontend"])
            else:
                assert len(where) == 1
                assert not any(maps_jax(pid) for pid in roles["frontend"])
        finally:
            assert served.stop() == 0, served.output()


def test_two_host_devices_get_a_device_process_each(tmp_path):
    write_mixer(tmp_path)
    served = Served(
        [str(tmp_path), "--workers", "1", "--device-type", "cpu", "--device-ids", "0,1"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, cwd=tmp_path,
    )
    try:
        served.wait_ready()
        roles = tree(served.proc.pid)
        assert len(roles["device"]) == 2, roles
        model = requests.get(served.url + "/model/mixer", timeout=10).json()["versions"][0]["models"][0]
        assert sorted((p["device"], p["pid"]) for p in model["placement"]) == sorted(
            zip(["cpu:0", "cpu:1"], sorted(roles["device"], key=lambda pid: _device_of(served.url, pid)))
        )
        session = requests.Session()
        for i in range(8):
            reply = post(served.url, "/model/mixer:fast", {"instances": [{"x": [float(i)] * 4}]}, session)
            assert reply.json()["instances"][0]["y"] == [2.0 * i + 1.0] * 4
    finally:
        assert served.stop() == 0, served.output()
    assert not any(child_processes(served.proc.pid))


def _device_of(url: str, pid: int) -> str:
    model = requests.get(url + "/model/mixer", timeout=10).json()["versions"][0]["models"][0]
    return next(p["device"] for p in model["placement"] if p["pid"] == pid)


def test_hot_reload_happens_in_the_device_process(tmp_path):
    write_mixer(tmp_path)
    served = Served([str(tmp_path), "--workers", "2", "--poll-interval", "0.3"], cwd=tmp_path)
    try:
        served.wait_ready()
        (device,) = tree(served.proc.pid)["device"]
        body = {"instances": [{"x": [1.0, 2.0, 3.0, 4.0]}]}
        assert post(served.url, "/model/mixer:fast", body).json()["instances"][0]["y"] == [3.0, 5.0, 7.0, 9.0]
        staging = tmp_path / "staging"
        export_to(staging / "affine.jaxexport", lambda x: x * 3.0, spec("b, 4"))
        (staging / "tile.jaxexport").write_bytes((tmp_path / "mixer" / "1" / "tile.jaxexport").read_bytes())
        staging.rename(tmp_path / "mixer" / "2")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            reply = post(served.url, "/model/mixer:fast", body)
            assert reply.status_code == 200, reply.text  # the switch loses no request
            if reply.json()["instances"][0]["y"] == [3.0, 6.0, 9.0, 12.0]:
                break
            time.sleep(0.1)
        assert reply.json()["instances"][0]["y"] == [3.0, 6.0, 9.0, 12.0]
        while time.monotonic() < deadline:  # version 1 is retired once its requests are done
            described = requests.get(served.url + "/model/mixer", timeout=10).json()
            if [v["version"] for v in described["versions"]] == [2]:
                break
            time.sleep(0.1)
        assert [v["version"] for v in described["versions"]] == [2]
        assert described["versions"][0]["models"][0]["placement"][0]["pid"] == device
        assert tree(served.proc.pid)["device"] == [device]  # reloaded in place, not restarted
    finally:
        assert served.stop() == 0, served.output()


def test_a_device_process_that_cannot_load_fails_the_start(tmp_path):
    write_servable(tmp_path, "broken", "raise ValueError('no model for you')\n", {"1/x": b""})
    result = subprocess.run(
        [sys.executable, "-m", "mserve.cli", "start", str(tmp_path), "--port", str(free_port()), "--workers", "2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no model for you" in result.stderr


START_SCRIPT = """
import sys, time
from mserve import server

server.start_servables(server.ServableStartConfig(sys.argv[1], "mixer"))
started = server.start_restful_server("127.0.0.1:" + sys.argv[2])
print("STARTED", flush=True)
sys.stdin.readline()
server.begin_shutdown()
print("SHUTTING DOWN", flush=True)
sys.stdin.read()  # until the test closes stdin
server.stop()
print("STOPPED", flush=True)
"""


def test_a_start_script_gets_frontends_and_a_device_process(tmp_path):
    write_mixer(tmp_path)
    script = tmp_path / "serve.py"
    script.write_text(START_SCRIPT)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MSERVE_PROCESSES"}
    env["MSERVE_WORKERS"] = "2"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "STARTED"
        roles = tree(proc.pid)
        assert len(roles["frontend"]) == 2 and len(roles["device"]) == 1, roles
        reply = post(f"http://127.0.0.1:{port}", "/model/mixer:fast", {"instances": [{"x": [0.5] * 4}]})
        assert reply.json()["instances"][0]["y"] == [2.0] * 4
        assert reply.json()["instances"][0]["frontend"] in roles["frontend"]
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/ready", timeout=10).status_code == 200
        proc.stdin.write("begin shutdown\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "SHUTTING DOWN"
        deadline = time.monotonic() + 10  # the front-ends hear it (a signal each) a moment later
        while time.monotonic() < deadline and requests.get(base + "/ready", timeout=10).status_code == 200:
            time.sleep(0.05)
        for _ in range(4):  # every front-end: not ready, still serving
            assert requests.get(base + "/ready", headers={"Connection": "close"}, timeout=10).status_code == 503
            assert post(base, "/model/mixer:fast", {"instances": [{"x": [0.5] * 4}]}).status_code == 200
        proc.stdin.close()
        assert proc.stdout.readline().strip() == "STOPPED"
        assert proc.wait(60) == 0
        assert not child_processes(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------- the pieces


def test_channel_passes_a_buffer_and_descriptors():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a), Channel(b)
    buffer = Buffer.create(4096)
    left.send(("buffer", buffer.size), fds=(buffer.fd,))
    kind, size = right.recv()
    mapped = Buffer.attach(right.take_fd(), size)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    descs, end = buffer.write([x, np.int32(7) * np.ones((), np.int32)])
    assert end % 64 == 0
    left.send(("run", descs))
    _, got = right.recv()
    assert np.array_equal(mapped.read(got[0]), x) and mapped.read(got[1]) == 7
    mapped.write([x + 1])  # the other side writes back over the same memory
    assert np.array_equal(buffer.read(descs[0]), x + 1)
    with pytest.raises(ValueError, match="do not fit"):
        buffer.write([np.zeros(2048, np.float32)])
    left.close()
    with pytest.raises(ChannelClosed):
        right.recv()
    buffer.close()
    mapped.close()
    right.close()


def test_device_groups_and_their_environment():
    configs = [
        server.ServableStartConfig("/s", "a", device_ids=[0, 1], device_type="gpu"),
        server.ServableStartConfig("/s", "b", device_ids=1, device_type="gpu"),
        server.ServableStartConfig("/s", "c", device_ids=0, device_type="cpu"),
    ]
    groups = plan_groups(configs)
    assert {g.key: [c.servable_name for c in cs] for g, cs in groups.items()} == {
        "gpu:0": ["a"], "gpu:1": ["a", "b"], "cpu:0": ["c"],
    }
    assert all(list(c.device_ids) == [1] for c in groups[DeviceGroup("gpu", (1,))])
    env, remapped = device_env(DeviceGroup("gpu", (1,)), {})
    assert remapped and env["CUDA_VISIBLE_DEVICES"] == "1" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    env, _ = device_env(DeviceGroup("gpu", (1,)), {"CUDA_VISIBLE_DEVICES": "4,6", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".4"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env
    env, _ = device_env(DeviceGroup("gpu", (0,)), {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"  # the user's setting wins
    env, remapped = device_env(DeviceGroup("cpu", (1,)), {})
    assert not remapped and env["JAX_PLATFORMS"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in env


def test_default_workers(monkeypatch):
    monkeypatch.delenv("MSERVE_WORKERS", raising=False)
    assert 1 <= server.default_workers() <= server.MAX_DEFAULT_WORKERS
    monkeypatch.setenv("MSERVE_WORKERS", "5")
    assert server.default_workers() == 5
    monkeypatch.setenv("MSERVE_WORKERS", "none")
    with pytest.raises(RuntimeError, match="MSERVE_WORKERS"):
        server.default_workers()
    monkeypatch.delenv("MSERVE_WORKERS")
    for cores, front_ends in ((1, 1), (2, 2), (4, 4), (16, 8)):  # one per core, at most 8
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert server.default_workers() == front_ends


def test_a_sharded_model_lives_in_one_device_process_for_all_its_devices(tmp_path):
    """A model that spans devices (issue 12's sharding) is one instance: its servable
    gets one device process owning both host devices; an ordinary servable on the
    same ids gets one process per device."""
    from test_sharding import MODEL_PARALLEL, write_mlp

    write_mlp(tmp_path, "sharded", MODEL_PARALLEL)
    write_mlp(tmp_path, "plain", None)
    groups = plan_groups([server.ServableStartConfig(tmp_path, n, device_ids=[0, 1], device_type="cpu")
                          for n in ("sharded", "plain")])
    assert {g.key: [c.servable_name for c in cs] for g, cs in groups.items()} == {
        "cpu:0+1": ["sharded"], "cpu:0": ["plain"], "cpu:1": ["plain"],
    }
    served = Served([str(tmp_path), "--workers", "1", "--device-type", "cpu", "--device-ids", "0,1"],
                    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, cwd=tmp_path)
    try:
        served.wait_ready()
        assert len(tree(served.proc.pid)["device"]) == 3
        sharded = requests.get(served.url + "/model/sharded", timeout=10).json()["versions"][0]["models"][0]
        plain = requests.get(served.url + "/model/plain", timeout=10).json()["versions"][0]["models"][0]
        assert len(sharded["instances"]) == 1 and len(sharded["instances"][0]) == 2  # one instance, two devices
        assert len({p["pid"] for p in sharded["placement"]}) == 1
        assert len({p["pid"] for p in plain["placement"]}) == 2
        x = {"instances": [{"x": [0.1 * i for i in range(16)]}]}
        a = post(served.url, "/model/sharded:predict", x).json()["instances"][0]["y"]
        b = post(served.url, "/model/plain:predict", x).json()["instances"][0]["y"]
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5)
    finally:
        assert served.stop() == 0, served.output()


def test_the_start_script_process_sees_the_servables_but_holds_no_model(tmp_path):
    """server.registry() in a start script lists what the device processes serve,
    without loading a model or JAX in the script's own process."""
    write_mixer(tmp_path)
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys\nfrom mserve import server\n"
        "server.start_servables(server.ServableStartConfig(sys.argv[1], 'mixer'))\n"
        "mixer = server.registry().servables()['mixer']\n"
        "print(sorted(mixer.versions), all(s.remote for s in mixer.versions[1].stages.values()),"
        " 'jaxlib' in open('/proc/self/maps').read(), flush=True)\n"
        "server.stop()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MSERVE_PROCESSES"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1]", "True", "False"]


# --------------------------------------------------------------------------- Model.call(subgraph=i)


def test_model_call_of_a_subgraph_runs_that_graph_in_the_device_process(tmp_path):
    """A Python stage in a front-end calls graph 0 and graph 1 of a model of two files
    (MindSpore's matmul_multi_subgraphs): each runs in the device process, the only one
    that loaded them; a graph index the model lacks fails with MindSpore's text, as
    in-process (tests/test_dropin.py::test_matmul_multi_subgraphs_calls_each_graph_by_index)."""
    write_matmul_subgraphs(tmp_path)  # its servable_config.py registers the npz_matmul backend
    served = Served([str(tmp_path), "--workers", "2"], cwd=tmp_path)
    try:
        served.wait_ready()
        roles = tree(served.proc.pid)
        assert len(roles["frontend"]) == 2 and len(roles["device"]) == 1, roles
        described = requests.get(served.url + "/model/matmul", timeout=10).json()
        (model,) = described["versions"][0]["models"]
        assert [p["pid"] for p in model["placement"]] == roles["device"]  # no front-end copy
        x = np.ones((128, 96), np.float32).tolist()
        y = np.ones((8, 96), np.float32).tolist()
        second = post(served.url, "/model/matmul:predict_second", {"instances": [{"y": y}]})
        assert second.json() == {"instances": [{"z": [8 * 48.0] * 16}]}, second.text  # graph 1 alone
        both = post(served.url, "/model/matmul:predict", {"instances": [{"x": x, "y": y}]})
        assert both.json() == {"instances": [{"z": [128 * 48.0 + 8 * 48.0] * 16}]}, both.text  # graph 0 + graph 1
        # graph 1 takes 8 rows: 128 are refused before anything is sent, in the model's words
        wrong = post(served.url, "/model/matmul:predict_second", {"instances": [{"y": x}]})
        assert wrong.status_code == 400 and wrong.json() == {"error_msg": (
            "Call Function 'matmul.second' Failed: Model(matmul_0.npz;matmul_1.npz, subgraph=1).call() failed: Given model input 0 size "
            "49152 not match the size 3072 defined in model (shape (128, 96) float32 given, (8, 96) float32 expected)")}, wrong.text
        bad = post(served.url, "/model/matmul:predict_bad", {"instances": [{"x": x, "y": y}]})
        assert bad.status_code == 400 and bad.json() == {"error_msg": (
            "Call Function 'matmul.bad_subgraph' Failed: Model(matmul_0.npz;matmul_1.npz, subgraph=2).call() failed: The model does not have "
            "subgraph of index 2, the subgraph count of the model is 2")}, bad.text
        # the front-ends keep serving after the failed calls
        assert post(served.url, "/model/matmul:predict_second", {"instances": [{"y": y}]}).json() == second.json()
    finally:
        assert served.stop() == 0, served.output()
