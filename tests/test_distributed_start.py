"""Distributed servables: starting and refusing, without a serving cluster.

Start-up waiting for agents (and a stop ending that wait), agents that cannot
join (no main host at the address, other model files), MindSpore's
``distributed`` API's refusals and its ``matmul_distributed`` example. Every
server and agent is a real process on this machine (forced CPU devices, gloo).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from distributed_support import agent_env, children, gone, mserve, ready_status, wait_for, write_mlp
from support import free_port, write_servable

from mserve import server

pytestmark = pytest.mark.timeout(300)

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
    with pytest.raises(RuntimeError, match="Cannot access model file .*missing.py"):
        distributed.startup_agents("127.0.0.1:6200", [str(tmp_path / "missing.py")])
    with pytest.raises(RuntimeError, match="'agent_ip' and parameter 'rank_start' must have values at the same time"):
        distributed.startup_agents("127.0.0.1:6200", [str(model)], rank_start=0)


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_hosts_without_an_address_is_a_clear_error():
    proc = subprocess.run(mserve("start", "--hosts", "2"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "needs both --distributed-address HOST:PORT and --hosts N" in proc.stderr


def test_an_agent_without_a_main_host_gives_up_with_a_clear_error():
    """Nobody listens at the address: the agent retries for --wait-main seconds,
    then exits 1 naming the address, not waiting forever."""
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = subprocess.run(mserve("agent", "--distributed-address", address, "--host-index", "0", "--wait-main", "2"),
                          capture_output=True, text=True, timeout=60, env=agent_env())
    assert proc.returncode == 1, proc.stderr
    assert f"no main host answered at {address} for 2 s" in proc.stderr
    assert "refused" in proc.stderr.lower() and "--distributed-address" in proc.stderr
    assert time.monotonic() - started < 30


def test_start_names_the_missing_hosts_and_a_stop_ends_the_wait(tmp_path):
    """`mserve start --hosts 2` (front-end and device processes) with no agent:
    /ready names both hosts and the command to run there while it waits without
    limit; a Ctrl+C ends the wait at once, leaving no process behind."""
    write_mlp(tmp_path)
    port, address = free_port(), f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        mserve("start", str(tmp_path), "--servable", "mlp", "--port", str(port), "--workers", "1",
               "--distributed-address", address, "--hosts", "2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(), start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        reply = wait_for(lambda: (r := ready_status(url)) is not None and "waiting for hosts 0, 1" in r.text and r,
                         90, "/ready names the missing hosts")
        assert reply.status_code == 503 and reply.headers.get("Retry-After")
        assert f"mserve agent --distributed-address {address} --host-index 0" in reply.json()["status"]
        family = [proc.pid, *children(proc.pid)]
        assert len(family) >= 3  # the server, its front-end, its device process
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "stopped while the device processes were loading" in err
    for pid in family:
        wait_for(lambda pid=pid: gone(pid), 10, f"process {pid} exits")


def test_single_process_start_gives_up_after_wait_agents(tmp_path):
    """`mserve start --workers 0 --hosts 2 --wait-agents 6` (all in one process):
    /ready names the hosts, then start-up gives up naming them."""
    write_mlp(tmp_path)
    port, address = free_port(), f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        mserve("start", str(tmp_path), "--servable", "mlp", "--port", str(port), "--workers", "0",
               "--distributed-address", address, "--hosts", "2", "--wait-agents", "6"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        reply = wait_for(lambda: (r := ready_status(url)) is not None and "waiting for hosts 0, 1" in r.text and r,
                         60, "/ready names the missing hosts")
        assert reply.status_code == 503
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
        mserve("start", str(main_root), "--servable", "mlp", "--port", str(free_port()), "--workers", "1",
               "--distributed-address", address, "--hosts", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(),
    )
    agent = subprocess.Popen(
        mserve("agent", "--distributed-address", address, "--host-index", "0", "--servable-directory",
               str(other_root)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=agent_env(),
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
    env = agent_env(devices=8)
    # started from elsewhere: relative paths are the scripts' own folder's, as in MindSpore
    main = subprocess.Popen([sys.executable, str(folder / "serving_server.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = subprocess.Popen([sys.executable, str(folder / "serving_agent.py")], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready():
            try:
                return requests.get(f"http://127.0.0.1:{rest_port}/ready", timeout=2).status_code == 200
            except requests.Timeout:
                return False  # a loaded machine while the group starts: ask again (wait_for's deadline holds)
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
    proc = subprocess.run(mserve("agent", "--help"), capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="120"))
    assert proc.returncode == 0
    assert "--distributed-address" in proc.stdout and "--host-index" in proc.stdout and "--wait-main" in proc.stdout
    assert "mserve agent --distributed-address" in proc.stdout.split("Examples", 1)[1]
