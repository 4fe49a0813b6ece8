"""Test helpers: write servable directories, export tiny JAX artifacts, run a server.

Servers here are the real thing: servables loaded through the backends, Waitress on
a free port of 127.0.0.1, requests sent over a socket.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import export

from mserve import server

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "servables"
ADD_BODY = {"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}


class _PortPicker:
    """Ports for servers the tests start, below the kernel's ephemeral range (from
    32768): a port the kernel hands out (``bind(("", 0))``) is also what it gives the
    next outgoing connection, and with several xdist workers one of those took a
    port between the test picking it and the server binding it. Each worker walks a
    slice of its own, so two workers never pick the same port."""

    FIRST, SLICE = 20000, 3000

    def __init__(self) -> None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        index = int(worker[2:]) if worker[2:].isdigit() else 0
        self.first = self.FIRST + (index % 4) * self.SLICE
        self.next = self.first + random.randrange(self.SLICE)

    def pick(self) -> int:
        for _ in range(self.SLICE):
            port = self.next
            self.next = self.first + (self.next + 1 - self.first) % self.SLICE
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
        raise RuntimeError(f"no free port in {self.first}-{self.first + self.SLICE - 1}")


_ports = _PortPicker()


def free_port() -> int:
    """A port that was free a moment ago, for servers started as subprocesses."""
    return _ports.pick()


class MserveStart:
    """``mserve start ARGS --port P --no-access-log`` as a subprocess (device and
    front-end processes, as a user runs it), its output in ``log_dir``."""

    def __init__(self, args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None, preexec_fn: Callable[[], None] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(log_dir) / f"mserve-{self.port}.log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mserve.cli", "start", *args, "--port", str(self.port), "--no-access-log"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1", **(env or {})},
            cwd=cwd, preexec_fn=preexec_fn,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        """Until ``/ready`` answers 200 and the server has said it serves."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200 and "serving on" in self.output():
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy machine
                pass
            time.sleep(0.1)
        raise AssertionError("not ready:\n" + self.output())

    def stop(self) -> int:
        """SIGTERM (a graceful stop), then its exit code; killed after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def child_processes(pid: int, role: str | None = None) -> list[int]:
    """The child processes of ``pid``; with ``role``, those running that module
    (``python -m ROLE``, e.g. ``mserve.runtime.frontend_role``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                line = Path(f"/proc/{entry}/cmdline").read_bytes() if role else b""
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and (role is None or role.encode() in line):
                found.append(int(entry))
    return found


def export_to(path: Path, fn: Callable[..., Any], *specs: jax.ShapeDtypeStruct) -> Path:
    """Write ``jax.export`` bytes of ``fn`` for ``specs`` to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export.export(jax.jit(fn))(*specs).serialize())
    return path


def spec(shape: str | Sequence[int], dtype: Any = jnp.float32) -> jax.ShapeDtypeStruct:
    """``spec("b, 4")`` (symbolic) or ``spec((2, 2))``."""
    dims = export.symbolic_shape(shape) if isinstance(shape, str) else tuple(shape)
    return jax.ShapeDtypeStruct(dims, dtype)


def write_servable(root: Path, name: str, config: str, files: dict[str, bytes | Path] | None = None) -> Path:
    """Create ``root/name/servable_config.py`` (dedented) and version files, given as
    ``{"1/model.jaxexport": bytes_or_source_path}``."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "servable_config.py").write_text(textwrap.dedent(config))
    for rel, content in (files or {}).items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return folder


@contextlib.contextmanager
def serving(
    configs: server.ServableStartConfig | Sequence[server.ServableStartConfig], **restful: Any
) -> Iterator[str]:
    """Start the servables and a RESTful server on a free port; yield its base URL."""
    try:
        server.start_servables(configs)
        # Tests run several servers in one process (module fixtures overlap): mserve's
        # additional=True lifts MindSpore's one-RESTful-server rule for them.
        restful.setdefault("additional", True)
        started = server.start_restful_server(restful.pop("address", "127.0.0.1:0"), **restful)
        yield started.url
    finally:
        server.stop()


# MindSpore's matmul_multi_subgraphs: one model of two graph files, called with
# ``model.call(..., subgraph=i)``. jax_export loads one file per model, so the
# servable registers its own backend (in servable_config.py, which every process
# that loads the servable runs, device processes included) that loads each file as
# a graph, as the MindIR backend does.
MATMUL_SUBGRAPHS_CONFIG = """
import numpy as np

from mserve import register
from mserve.backends import Backend, TensorSpec, register_backend


class MatmulGraph:
    \"\"\"One graph of the net: ``sum(x @ w, axis=0)`` for a fixed number of rows of ``x``.\"\"\"

    def __init__(self, w, rows):
        self.inputs = [TensorSpec(np.dtype(np.float32), (rows, w.shape[0]))]
        self.outputs = [TensorSpec(np.dtype(np.float32), (w.shape[1],))]
        self.w = w

    def predict(self, arrays):
        return [(arrays[0] @ self.w).sum(axis=0)]


def load_matmul(request):
    graphs = []
    for path in request.files:  # one graph per file, in declaration order
        with np.load(path) as data:
            graphs.append(MatmulGraph(data["w"], int(data["rows"])))
    graphs[0].subgraphs = graphs
    return graphs[0]


register_backend(Backend(name="npz_matmul", formats=("npz_matmul",), device_types=("cpu",), load=load_matmul))

model = register.declare_model(model_file=["matmul_0.npz", "matmul_1.npz"], model_format="npz_matmul",
                               with_batch_dim=False)


def process(x, y):
    z1 = model.call(x, subgraph=0)  # 128,96 matmul 96,16 -> reduce sum axis 0 -> 16
    z2 = model.call(y, subgraph=1)  # 8,96 matmul 96,16 -> reduce sum axis 0 -> 16
    return z1 + z2


def second(y):
    return model.call(y, subgraph=1)


def bad_subgraph(x, y):
    return model.call(x, subgraph=2)


@register.register_method(output_names=["z"])
def predict(x, y):
    z = register.add_stage(process, x, y, outputs_count=1)
    return z


@register.register_method(output_names=["z"])
def predict_second(y):
    return register.add_stage(second, y, outputs_count=1)


@register.register_method(output_names=["z"])
def predict_bad(x, y):
    return register.add_stage(bad_subgraph, x, y, outputs_count=1)
"""


def write_matmul_subgraphs(root: Path) -> Path:
    """The matmul servable (``MATMUL_SUBGRAPHS_CONFIG``) with version 1: graph 0 takes
    128 rows of x, graph 1 takes 8 rows of y, both with w = 0.5 (96 x 16)."""
    import numpy as np

    folder = write_servable(root, "matmul", MATMUL_SUBGRAPHS_CONFIG)
    (folder / "1").mkdir()
    w = np.full((96, 16), 0.5, np.float32)
    np.savez(folder / "1/matmul_0.npz", w=w, rows=128)
    np.savez(folder / "1/matmul_1.npz", w=w, rows=8)
    return folder
