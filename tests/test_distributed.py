"""Distributed servables: one sharded model over the JAX processes of several hosts.

Two `mserve agent` processes on localhost (two forced CPU devices each, gloo
collectives) form a 4-device mesh; this test process is the main host (the server
API with a distributed group, REST and gRPC on real sockets). Starting a JAX group
takes seconds on a busy machine, so the group is started once per module and the
fault test (killing an agent) runs last.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from support import free_port, write_servable

from mserve import server
from mserve.distributed.coordinator import GroupSettings
from mserve.distributed.serving import start_group, stop_group

pytestmark = pytest.mark.timeout(400)

HIDDEN = 32
MLP_CONFIG = """
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mserve import register


def mlp(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


model = register.declare_model(
    model_file="mlp.safetensors", model_format="jax_function",
    options={
        "function": mlp,
        "input_specs": [("b, 8", "float32")],
        "sharding": {"mesh": "model", "params": {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}},
    },
)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def mlp_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w1": rng.normal(size=(8, HIDDEN)).astype(np.float32), "b1": rng.normal(size=(HIDDEN,)).astype(np.float32),
        "w2": rng.normal(size=(HIDDEN, 4)).astype(np.float32), "b2": rng.normal(size=(4,)).astype(np.float32),
    }


def unsharded(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def write_mlp(root: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import save

    params = mlp_weights()
    write_servable(root, "mlp", MLP_CONFIG, {"1/mlp.safetensors": save(params)})
    return params


def agent_env() -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env.pop("MSERVE_PROCESSES", None)
    return env


class Agents:
    """`mserve agent` processes on this machine, their output in files."""

    def __init__(self, address: str, logs: Path):
        self.address = address
        self.logs = logs
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, index: int) -> subprocess.Popen:
        log = open(self.logs / f"agent{index}-{time.monotonic_ns()}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mserve.cli", "agent", "--distributed-address", self.address,
             "--host-index", str(index)], stdout=log, stderr=subprocess.STDOUT, env=agent_env(),
        )
        proc.log_path = Path(log.name)  # type: ignore[attr-defined]
        self.procs[index] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise AssertionError(f"agent {proc.pid} did not stop on SIGTERM")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie child of an agent that has exited counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result is not None and result is not False:  # a 503 Response is falsy
            return result
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout:g} s: {what}")


DECLARED = """
from mserve.server import distributed, register

model = distributed.declare_servable(rank_size=8, stage_size={stage_size}, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def test_declare_servable_refuses_pipeline_stages(tmp_path):
    from mserve.errors import ServableLoadError
    from mserve.serving.servable import load_definition

    write_servable(tmp_path, "matmul", DECLARED.format(stage_size=2))
    with pytest.raises(ServableLoadError, match="stage_size=2: .* declare stage_size=1"):
        load_definition(tmp_path, "matmul")


def test_a_distributed_servable_without_hosts_says_how_to_start_it(tmp_path):
    from mserve.errors import ServableLoadError

    write_servable(tmp_path, "matmul", DECLARED.format(stage_size=1), {"1/jax_model.py": b"# not read"})
    with pytest.raises(ServableLoadError, match="spans hosts .*start_servable"):
        server.start_servables(server.ServableStartConfig(tmp_path, "matmul"))
    server.stop()


def test_startup_agents_refuses_what_jax_has_no_use_for(tmp_path):
    from mserve.server import distributed

    model = tmp_path / "jax_model.py"
    model.write_text("# a model file")
    with pytest.raises(RuntimeError, match="group_config_files: .*sharding"):
        distributed.startup_agents("127.0.0.1:6200", [str(model)], group_config_files=["g.pb"])
    with pytest.raises(RuntimeError, match="dec_key: .*not encrypted"):
        distributed.startup_agents("127.0.0.1:6200", [str(model)], dec_key=b"0" * 16)
    with pytest.raises(RuntimeError, match="a Python model file"):
        distributed.startup_agents("127.0.0.1:6200", [str(_touch(tmp_path / "matmul.mindir"))])
    with pytest.raises(RuntimeError, match="'agent_ip' and parameter 'rank_start' must have values at the same time"):
        distributed.startup_agents("127.0.0.1:6200", [str(model)], rank_start=0)


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    params = write_mlp(root)
    group = start_group(GroupSettings(f"127.0.0.1:{free_port()}", hosts=2, wait_agents=240, heartbeat_timeout=2.0))
    agents = Agents(group.address, tmp_path_factory.mktemp("logs"))
    worker_pids: list[int] = []
    try:
        for index in (0, 1):
            agents.start(index)
        server.start_servables(server.ServableStartConfig(root, "mlp", max_batch_size=4, max_batch_delay_ms=50))
        rest = server.start_restful_server("127.0.0.1:0")
        grpc_port = free_port()
        server.start_grpc_server(f"127.0.0.1:{grpc_port}")
        yield {"url": rest.url, "grpc": f"127.0.0.1:{grpc_port}", "params": params, "group": group,
               "agents": agents, "worker_pids": worker_pids}
    finally:
        worker_pids.extend(r["pid"] for r in group.reports.values())
        server.stop()
        stop_group(group)
        agents.stop_all()
    # Nothing outlives the stop: every host's JAX process is gone with its agent.
    for pid in worker_pids:
        wait_for(lambda pid=pid: gone(pid), 10, f"JAX process {pid} exits")


def predict(url: str, rows: np.ndarray) -> requests.Response:
    body = {"instances": [{"x": row.tolist()} for row in rows]}
    return requests.post(f"{url}/model/mlp:predict", json=body, timeout=60)


def test_rest_answers_equal_the_unsharded_model(cluster):
    rows = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    reply = predict(cluster["url"], rows)
    assert reply.status_code == 200, reply.text
    got = np.array([item["y"] for item in reply.json()["instances"]], np.float32)
    np.testing.assert_allclose(got, unsharded(cluster["params"], rows), rtol=1e-5, atol=1e-5)
    assert requests.get(f"{cluster['url']}/ready", timeout=5).status_code == 200


def test_grpc_answers_equal_the_unsharded_model(cluster):
    from mserve.client import Client

    rows = np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32)
    result = Client(cluster["grpc"], "mlp", "predict").infer([{"x": row} for row in rows])
    got = np.array([item["y"] for item in result], np.float32)
    np.testing.assert_allclose(got, unsharded(cluster["params"], rows), rtol=1e-5, atol=1e-5)


def test_each_process_holds_only_its_shards(cluster):
    reports = cluster["group"].process_reports()
    assert sorted(reports) == [0, 1]
    devices = [set(r["devices"]) for r in reports.values()]
    assert len(devices[0]) == 2 and len(devices[1]) == 2 and not devices[0] & devices[1]
    total = sum(a.nbytes for a in cluster["params"].values())
    replicated = cluster["params"]["b2"].nbytes  # not split: every device holds it
    for report in reports.values():
        # four devices, two on each process: every split weight is held a quarter per device
        assert report["weights"]["w1"]["shards"] == [[8, HIDDEN // 4]] * 2
        assert report["weights"]["w2"]["shards"] == [[HIDDEN // 4, 4]] * 2
        assert report["bytes"] == (total - replicated) // 2 + 2 * replicated
        assert report["bytes"] < total
    # and the agent's output says so too
    agent0 = cluster["agents"].procs[0]
    assert "SHARDS" in agent0.log_path.read_text()


def test_concurrent_requests_share_batches_across_all_hosts(cluster):
    group = cluster["group"]
    before_group = group.batches
    before = {i: r["batches"] for i, r in group.process_reports().items()}
    rows = np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32)
    replies: list[requests.Response] = []
    start = threading.Barrier(8)

    def one(row: np.ndarray) -> None:
        start.wait()
        replies.append(predict(cluster["url"], row[None, :]))

    threads = [threading.Thread(target=one, args=(row,)) for row in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    got = sorted(tuple(np.round(r.json()["instances"][0]["y"], 4)) for r in replies)
    want = sorted(tuple(np.round(y, 4)) for y in unsharded(cluster["params"], rows))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-4)
    ran = group.batches - before_group
    assert 2 <= ran < 8  # 8 requests, at most 4 rows a batch: fewer batches than requests
    after = {i: r["batches"] for i, r in group.process_reports().items()}
    assert all(after[i] - before[i] == ran for i in after)  # every host ran every batch, once


def test_an_agent_index_out_of_range_is_refused(cluster):
    proc = subprocess.run(
        [sys.executable, "-m", "mserve.cli", "agent", "--distributed-address", cluster["group"].address,
         "--host-index", "5"], capture_output=True, text=True, timeout=60, env=agent_env(),
    )
    assert proc.returncode == 2
    assert "host index 5 is out of range" in proc.stderr and "indices 0-1" in proc.stderr


def test_an_agent_with_another_jax_version_is_refused(cluster):
    from mserve.distributed.links import connect

    link = connect(cluster["group"].address)
    try:
        link.send(("agent", {"index": 0, "jax": "0.0.1", "coordinator_port": 1}))
        kind, reason = link.recv(timeout=10)
    finally:
        link.close()
    assert kind == "refused"
    assert "jax 0.0.1" in reason and "install the same version on every host" in reason
    assert requests.get(f"{cluster['url']}/ready", timeout=5).status_code == 200  # the group did not notice


def test_a_killed_agent_makes_it_unready_then_it_serves_again(cluster):
    url, agents, group = cluster["url"], cluster["agents"], cluster["group"]
    cluster["worker_pids"].extend(r["pid"] for r in group.reports.values())
    victim = agents.procs[1]
    victim.kill()
    victim.wait(5)
    started = time.monotonic()

    def unavailable():
        reply = predict(url, np.ones((1, 8), np.float32))
        return reply if reply.status_code == 503 else None

    reply = wait_for(unavailable, 10, "a predict answers 503")
    assert reply.headers.get("Retry-After")
    assert "host 1" in reply.json()["error_msg"]
    ready = requests.get(f"{url}/ready", timeout=5)
    assert ready.status_code == 503 and "host 1" in ready.json()["status"]
    assert time.monotonic() - started < 10
    # the surviving host's JAX process was stopped too (a collective would wait for host 1 forever)
    for pid in cluster["worker_pids"]:
        wait_for(lambda pid=pid: gone(pid), 10, f"JAX process {pid} of the broken generation exits")

    # killed again while the new group loads: unready, naming the host, and no hang
    agents.start(1)
    wait_for(lambda: group.state == "starting" and len(group.reports) < 2 or None, 120, "the group starts loading")
    agents.procs[1].kill()
    agents.procs[1].wait(5)
    def waiting_for_host_1():
        reply = requests.get(f"{url}/ready", timeout=5)
        status = reply.json()["status"]
        return reply if reply.status_code == 503 and "waiting for host 1" in status else None

    ready = wait_for(waiting_for_host_1, 10, "/ready names host 1 again")
    assert ready.headers.get("Retry-After")
    assert predict(url, np.ones((1, 8), np.float32)).status_code == 503

    agents.start(1)
    wait_for(lambda: requests.get(f"{url}/ready", timeout=5).status_code == 200, 240, "the group serves again")
    rows = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
    reply = predict(url, rows)
    assert reply.status_code == 200, reply.text
    got = np.array([item["y"] for item in reply.json()["instances"]], np.float32)
    np.testing.assert_allclose(got, unsharded(cluster["params"], rows), rtol=1e-5, atol=1e-5)
    assert group.restarts >= 1


def test_start_waits_for_agents_and_names_the_missing_hosts(tmp_path):
    """`mserve start --hosts 2` with no agent: /ready names both hosts while it waits,
    then start-up gives up after --wait-agents with an error naming them."""
    write_mlp(tmp_path)
    port, address = free_port(), f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mserve.cli", "start", str(tmp_path), "--servable", "mlp", "--port", str(port),
         "--distributed-address", address, "--hosts", "2", "--wait-agents", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
    )
    try:
        def waiting():
            try:
                reply = requests.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            except requests.ConnectionError:
                return None
            return reply if "waiting for hosts 0, 1" in reply.text else None

        reply = wait_for(waiting, 60, "/ready names the missing hosts")
        assert reply.status_code == 503 and reply.headers.get("Retry-After")
        assert f"--distributed-address {address}" in reply.json()["status"]
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "not ready within 6 s" in err and "hosts 0, 1" in err


def test_a_host_with_other_model_files_fails_the_start(tmp_path):
    """`mserve start --hosts 1` and an agent whose copy of the weights differs: the
    start fails with a message naming the file and the host."""
    main_root, other_root = tmp_path / "main", tmp_path / "other"
    write_mlp(main_root)
    write_mlp(other_root)
    weights = other_root / "mlp" / "1" / "mlp.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mserve.cli", "start", str(main_root), "--servable", "mlp", "--port", str(free_port()),
         "--distributed-address", address, "--hosts", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "mserve.cli", "agent", "--distributed-address", address, "--host-index", "0",
         "--servable-directory", str(other_root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=agent_env(),
    )
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        for p in (proc, agent):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 1
    assert "mlp.safetensors differs from the main host's copy" in err and "host 0" in err


def test_hosts_without_an_address_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "mserve.cli", "start", "--hosts", "2"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "needs both --distributed-address HOST:PORT and --hosts N" in proc.stderr


EXAMPLE = Path(__file__).resolve().parent / "examples" / "matmul_distributed"


def test_mindspore_matmul_distributed_example(tmp_path):
    """MindSpore's matmul_distributed, ported: its servable config and gRPC client with
    the import swapped, its start scripts, its rank table (one server, eight devices);
    the MindIR files replaced by a JAX model file and weights. One agent, 8 CPU devices."""
    from safetensors.numpy import save_file

    folder = tmp_path / "matmul_distributed"
    shutil.copytree(EXAMPLE, folder)
    save_file({"matmul_weight": np.full((96, 16), 0.5, np.float32)}, str(folder / "matmul" / "1" / "matmul.safetensors"))
    distributed, grpc_port, rest_port = free_port(), free_port(), free_port()
    for script in ("serving_server.py", "serving_agent.py", "serving_client.py"):
        path = folder / script
        text = path.read_text().replace("127.0.0.1:6200", f"127.0.0.1:{distributed}")
        text = text.replace("127.0.0.1:5500", f"127.0.0.1:{grpc_port}").replace("localhost:5500", f"localhost:{grpc_port}")
        path.write_text(text.replace("127.0.0.1:1500", f"127.0.0.1:{rest_port}"))
    env = dict(agent_env(), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    # started from elsewhere: relative paths are the scripts' own folder's, as in MindSpore
    main = subprocess.Popen([sys.executable, str(folder / "serving_server.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = subprocess.Popen([sys.executable, str(folder / "serving_agent.py")], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready():
            try:
                return requests.get(f"http://127.0.0.1:{rest_port}/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                assert main.poll() is None, main.stdout.read()
                return False

        wait_for(ready, 240, "the distributed matmul serves")
        client = subprocess.run([sys.executable, str(folder / "serving_client.py")], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stdout + client.stderr
        assert "'y'" in client.stdout and "-48." in client.stdout  # -(ones(128, 96) @ 0.5)
        main.send_signal(signal.SIGINT)
        main.wait(60)
        assert main.returncode == 0
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        assert agent.returncode == 0
    finally:
        for proc in (main, agent):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_agent_help_has_examples():
    proc = subprocess.run([sys.executable, "-m", "mserve.cli", "agent", "--help"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, COLUMNS="120"))
    assert proc.returncode == 0
    assert "--distributed-address" in proc.stdout and "--host-index" in proc.stdout
    assert "mserve agent --distributed-address" in proc.stdout.split("Examples", 1)[1]

