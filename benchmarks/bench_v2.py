"""Open Inference Protocol (KServe v2) REST: mserve against MLServer 1.7.1, the same JAX add.

    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_v2.py [--seconds 3] [--rounds 3]
    .venv/bin/python benchmarks/bench_v2.py --tiny          # a few seconds, for CI

Both servers run with their default settings and serve a 2x2 float32 add compiled by
JAX, one instance per request: mserve its bundled ``add`` servable (``mserve start
--servable add``: front-end processes and a device process), MLServer a custom
runtime calling ``jax.jit(lambda a, b: a + b)`` (written to a temporary folder here).
MLServer needs its own virtualenv (``--mlserver-python``; default
/work/wt/mlserver-venv/bin/python when it exists):

    python3 -m venv /work/wt/mlserver-venv
    /work/wt/mlserver-venv/bin/pip install mlserver==1.7.1 'uvloop<0.22' jax

Without it, only mserve is measured (as ``--tiny`` does in CI where it is absent).

The load generator is the same for both: ``--clients`` processes of asyncio callers,
each caller one keep-alive HTTP/1.1 connection sending the same pre-built v2 JSON infer
request back to back; every reply is parsed and its ``y`` checked. Rounds alternate
the servers at each concurrency, so both see the same noise; the table gives the
median of the rounds. Server CPU per request is the CPU time (from /proc) of the
server's whole process tree over the round, divided by the requests it answered.
The load generator shares the machine with the servers: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grpc import free_port  # noqa: E402
from proc_cpu import tree_cpu  # noqa: E402  (the same /proc accounting as the other benchmarks)

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
EXPECTED = (X + X).ravel().tolist()
WARMUP = 0.5
DEFAULT_MLSERVER = Path("/work/wt/mlserver-venv/bin/python")

MLSERVER_MODEL = '''
import jax
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class JaxAdd(MLModel):
    """The same 2x2 float32 add as mserve's add servable, compiled by JAX."""

    async def load(self) -> bool:
        self._add = jax.jit(lambda a, b: a + b)
        zeros = np.zeros((2, 2), np.float32)
        self._add(zeros, zeros).block_until_ready()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x1, x2 = (NumpyCodec.decode_input(tensor) for tensor in payload.inputs)
        y = np.asarray(self._add(x1, x2))
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
'''


def infer_body(mindspore: bool = False) -> bytes:
    if mindspore:  # the same call through MindSpore's protocol
        return orjson.dumps({"instances": [{"x1": X.tolist(), "x2": X.tolist()}]})
    tensors = [{"name": n, "shape": [2, 2], "datatype": "FP32", "data": X.ravel().tolist()} for n in ("x1", "x2")]
    return orjson.dumps({"inputs": tensors})


def reply_ok(body: bytes, mindspore: bool = False) -> bool:
    try:
        reply = orjson.loads(body)
        if mindspore:
            return np.asarray(reply["instances"][0]["y"]).ravel().tolist() == EXPECTED
        outputs = reply["outputs"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return False
    return len(outputs) == 1 and outputs[0]["data"] == EXPECTED and outputs[0]["shape"] == [2, 2]


# ------------------------------------------------------------------ load generator


async def _callers(port: int, path: str, callers: int, start: float, seconds: float) -> tuple[int, int]:
    mindspore = path.startswith("/model/")
    body = infer_body(mindspore)
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    done, errors = 0, 0
    measure_from, end = start + WARMUP, start + WARMUP + seconds

    async def caller() -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < end:
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                reply = await reader.readexactly(length)
                if not head.startswith(b"HTTP/1.1 200") or not reply_ok(reply, mindspore):
                    errors += 1
                elif sent >= measure_from:
                    done += 1
        finally:
            writer.close()

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    await asyncio.gather(*(caller() for _ in range(callers)))
    return done, errors


def _client_process(args: tuple) -> tuple[int, int]:
    return asyncio.run(_callers(*args))


def drive(server: "Server", concurrency: int, seconds: float, clients: int) -> dict[str, float]:
    """``concurrency`` connections over ``min(clients, concurrency)`` processes: req/s, CPU µs/request."""
    processes = max(1, min(clients, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    start = time.perf_counter() + 1.0
    used = tree_cpu(server.pid)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        results = pool.map(_client_process, [(server.port, server.path, n, start, seconds) for n in shares])
    cpu = tree_cpu(server.pid) - used
    done = sum(d for d, _ in results)
    calls = done * (seconds + WARMUP) / seconds  # the warm-up's calls used CPU too
    return {"rps": done / seconds, "cpu_us": cpu / calls * 1e6 if calls else float("nan"),
            "errors": sum(e for _, e in results)}


# ------------------------------------------------------------------ servers


class Server:
    name = ""
    path = ""
    port = 0
    pid = 0
    proc: subprocess.Popen

    def wait_ready(self, timeout: float = 300.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class MserveServer(Server):
    """``mserve start --servable add``: default settings, v2 on the REST port."""

    name = "mserve"
    path = "/v2/models/add.add_common/infer"

    def __init__(self):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        mserve = Path(sys.executable).with_name("mserve")
        command = [str(mserve)] if mserve.exists() else [sys.executable, "-m", "mserve.cli"]
        self.proc = subprocess.Popen(
            [*command, "start", "--servable", "add", "--port", str(self.port), "--no-access-log"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"}, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.wait_ready()


class MserveMindSporeRoute(Server):
    """The same mserve server, called through MindSpore's protocol (``--mindspore-route``)."""

    name = "mserve (MindSpore)"
    path = "/model/add:add_common"

    def __init__(self, served: MserveServer):
        self.port, self.pid, self.proc, self.log = served.port, served.pid, served.proc, served.log

    def stop(self) -> None:
        pass  # the mserve server's own stop ends it


class MLServerServer(Server):
    """MLServer 1.7.1 with a custom runtime (JAX add), default settings but the ports."""

    name = "MLServer 1.7.1"
    path = "/v2/models/add/infer"

    def __init__(self, python: Path):
        self.port = free_port()
        self.folder = tempfile.TemporaryDirectory()
        root = Path(self.folder.name)
        (root / "model.py").write_text(MLSERVER_MODEL)
        (root / "model-settings.json").write_text(json.dumps({"name": "add", "implementation": "model.JaxAdd"}))
        (root / "settings.json").write_text(json.dumps(
            {"http_port": self.port, "grpc_port": free_port(), "metrics_port": free_port()}))
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(python.with_name("mlserver")), "start", str(root)], cwd=root, stdout=self.log,
            stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.wait_ready()

    def stop(self) -> None:
        super().stop()
        self.folder.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table gives their medians")
    parser.add_argument("--concurrency", default="4,16", help="connections in flight, comma-separated")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--mlserver-python", type=Path, default=DEFAULT_MLSERVER,
                        help="python of MLServer's virtualenv (skipped when absent)")
    parser.add_argument("--mindspore-route", action="store_true",
                        help="also drive mserve's MindSpore route (the same call, MindSpore's protocol)")
    parser.add_argument("--tiny", action="store_true", help="one short round at c=4 (CI: it runs, not how fast)")
    args = parser.parse_args()
    if args.tiny:
        args.seconds, args.rounds, args.concurrency = 0.5, 1, "4"
    levels = [int(c) for c in args.concurrency.split(",")]

    servers: list[Server] = []
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        servers.append(MserveServer())
        if args.mindspore_route:
            servers.append(MserveMindSporeRoute(servers[0]))
        if args.mlserver_python.exists():
            servers.append(MLServerServer(args.mlserver_python))
        else:
            print(f"MLServer skipped: no {args.mlserver_python} (see --help)")
        for _ in range(args.rounds):
            for c in levels:
                for server in servers:
                    rows.setdefault((server.name, c), []).append(drive(server, c, args.seconds, args.clients))
    finally:
        for server in servers:
            server.stop()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"load generator: {args.clients} processes of asyncio keep-alive HTTP/1.1 connections, "
          f"{args.seconds:g}s per row after {WARMUP:g}s warm-up, median of {args.rounds} alternating rounds")
    print(f"{'server':<20} {'conc':>4} {'req/s':>9} {'CPU us/req':>10} {'errors':>6}")
    medians: dict[tuple[str, int], tuple[float, float]] = {}
    for (name, c), results in rows.items():
        rps = statistics.median(r["rps"] for r in results)
        cpu = statistics.median(r["cpu_us"] for r in results)
        medians[(name, c)] = (rps, cpu)
        print(f"{name:<20} {c:>4} {rps:>9.0f} {cpu:>10.0f} {sum(r['errors'] for r in results):>6.0f}")
    for c in levels:
        ours, theirs = medians.get((MserveServer.name, c)), medians.get((MLServerServer.name, c))
        if ours and theirs and theirs[0]:
            print(f"c={c}: mserve / MLServer = {ours[0] / theirs[0]:.2f}x req/s, "
                  f"{theirs[1] / ours[1]:.2f}x less CPU per request")
    if any(r["errors"] for results in rows.values() for r in results):
        sys.exit("some requests failed")


if __name__ == "__main__":
    main()
