"""Helpers of the distributed-servable tests: a sharded MLP servable, `mserve agent`
and `mserve start` processes on this machine (forced CPU devices, gloo), waiting.

Every process is real: the agents are `mserve agent` commands, each starting its
host's JAX process; the main host is `mserve start` (or the server API in-process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import requests

from support import write_servable

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


def agent_env(devices: int = 2) -> dict[str, str]:
    """Each host's JAX process sees ``devices`` CPU devices; the server runs in its
    default process mode (device and front-end processes)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env.pop("MSERVE_PROCESSES", None)
    return env


def mserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "mserve.cli", *args]


class Agents:
    """`mserve agent` processes on this machine, their output in files."""

    def __init__(self, address: str, logs: Path):
        self.address = address
        self.logs = logs
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, index: int, *extra: str) -> subprocess.Popen:
        log = open(self.logs / f"agent{index}-{time.monotonic_ns()}.log", "w")
        proc = subprocess.Popen(
            mserve("agent", "--distributed-address", self.address, "--host-index", str(index), *extra),
            stdout=log, stderr=subprocess.STDOUT, env=agent_env(),
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


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (an agent's JAX process)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


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


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result is not None and result is not False:  # a 503 Response is falsy
            return result
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def ready_status(url: str) -> requests.Response | None:
    """``GET /ready`` of a server that may not listen yet (None then)."""
    try:
        return requests.get(f"{url}/ready", timeout=5)
    except requests.ConnectionError:
        return None


def predict(url: str, rows: np.ndarray, session: Any = requests) -> requests.Response:
    body = {"instances": [{"x": row.tolist()} for row in rows]}
    return session.post(f"{url}/model/mlp:predict", json=body, timeout=60)
