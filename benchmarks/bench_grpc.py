"""gRPC throughput and latency: the add servable over MindSpore Serving's MSService/Predict.

    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_grpc.py [--seconds 5] [--mindspore] [--bare]

Starts `mserve start --grpc-port` in one process (``--workers 0``) and in the default
architecture (``--workers N`` front-ends and a device process; gRPC is then served by
N front-ends of its own sharing the port with SO_REUSEPORT, their model calls going to
the device process) and, with
``--mindspore``, MindSpore Serving 2.0.2's own add example (the anchor in
../shared/anchors/mindspore_serving, on free ports of its own), then drives every
server with the same load generator, one concurrency at a time, the servers taking
turns at each concurrency so that they see the same noise.

The load generator: ``P`` processes (``--clients``, at most the concurrency), each an
asyncio loop with its share of the ``C`` callers; every caller has its own channel,
so its own TCP connection (as ``wrk -cC``), and sends the same pre-serialized
``PredictRequest`` (the add request, two 2x2 float32 tensors) back to back. Every
reply is checked: the first one of each caller is parsed and its ``y`` compared with
the expected sum, later ones must be byte-identical to it. The load generator
shares the CPUs with the servers: compare rows of one run, not runs of different days.
Each row also gives the CPU time the server's processes used per call, steadier than
req/s on a busy machine; ``--bare`` adds grpcio's Python server answering a constant
reply, the floor under any Python gRPC server.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from proc_cpu import tree_cpu  # noqa: E402


def _anchor() -> Path:
    """The MindSpore Serving anchor scripts: $MSS_ANCHOR, else shared/ beside the repository
    (or beside a folder holding it, as for git worktrees)."""
    if os.environ.get("MSS_ANCHOR"):
        return Path(os.environ["MSS_ANCHOR"])
    for parent in REPO.parents:
        candidate = parent / "shared" / "anchors" / "mindspore_serving"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "anchors" / "mindspore_serving"


ANCHOR = _anchor()
PREDICT = "/mindspore.serving.proto.MSService/Predict"
X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
WARMUP = 0.5  # seconds of calls before measuring, per row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_request() -> bytes:
    from mserve.protocol import ms_service_pb2 as pb

    request = pb.PredictRequest()
    request.servable_spec.name, request.servable_spec.method_name = "add", "add_common"
    instance = request.instances.add()
    for name in ("x1", "x2"):
        tensor = instance.items[name]
        tensor.dtype = pb.MS_FLOAT32
        tensor.shape.dims.extend(X.shape)
        tensor.data = X.tobytes()
    return request.SerializeToString()


def reply_ok(data: bytes) -> bool:
    from mserve.protocol import ms_service_pb2 as pb

    reply = pb.PredictReply.FromString(data)
    if reply.error_msg or len(reply.instances) != 1:
        return False
    y = reply.instances[0].items["y"]
    return y.dtype == pb.MS_FLOAT32 and list(y.shape.dims) == [2, 2] and y.data == (X + X).tobytes()


# ------------------------------------------------------------------ load generator


async def _callers(target: str, callers: int, start: float, seconds: float, request: bytes) -> tuple[list[float], int]:
    import grpc

    latencies: list[float] = []
    errors = 0
    measure_from, end = start + WARMUP, start + WARMUP + seconds

    async def caller() -> None:
        nonlocal errors
        async with grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(PREDICT)  # bytes in, bytes out: no client-side (de)serializing
            expected = None
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                try:
                    reply = await call(request, timeout=30)
                except grpc.RpcError:
                    errors += 1
                    continue
                done = time.perf_counter()
                if reply != expected:
                    if reply_ok(reply):
                        expected = reply
                    else:
                        errors += 1
                        continue
                if sent >= measure_from:
                    latencies.append(done - sent)

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    await asyncio.gather(*(caller() for _ in range(callers)))
    return latencies, errors


def _client_process(args: tuple) -> tuple[list[float], int]:
    return asyncio.run(_callers(*args))


def drive(target: str, concurrency: int, seconds: float, clients: int) -> dict[str, float]:
    """``concurrency`` callers over ``min(clients, concurrency)`` processes; req/s, p50, p99 (ms)."""
    processes = max(1, min(clients, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    request = add_request()
    start = time.perf_counter() + 1.0  # every process starts calling at the same moment
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        results = pool.map(_client_process, [(target, n, start, seconds, request) for n in shares])
    latencies = np.array([x for lat, _ in results for x in lat])
    errors = sum(e for _, e in results)
    if not len(latencies):
        return {"rps": 0.0, "p50": float("nan"), "p99": float("nan"), "errors": errors}
    return {
        "rps": len(latencies) / seconds,
        "p50": float(np.percentile(latencies, 50) * 1000),
        "p99": float(np.percentile(latencies, 99) * 1000),
        "errors": errors,
    }


# ------------------------------------------------------------------ servers


BARE_SERVER = """
import signal, sys
from concurrent import futures
import grpc
reply = bytes.fromhex(sys.argv[2])
handler = grpc.method_handlers_generic_handler(
    "mindspore.serving.proto.MSService", {"Predict": grpc.unary_unary_rpc_method_handler(lambda request, context: reply)})
server = grpc.server(futures.ThreadPoolExecutor(16))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1])
server.start()
print("serving on", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""


class BareGrpcServer:
    """grpcio's Python server answering a constant reply: the floor of any Python gRPC server."""

    name = "bare grpcio, constant reply"

    def __init__(self):
        from mserve.protocol import ms_service_pb2 as pb

        reply = pb.PredictReply()
        reply.servable_spec.name, reply.servable_spec.method_name = "add", "add_common"
        y = reply.instances.add().items["y"]
        y.dtype = pb.MS_FLOAT32
        y.shape.dims.extend(X.shape)
        y.data = (X + X).tobytes()
        self.target = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", BARE_SERVER, self.target, reply.SerializeToString().hex()],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class MserveServer:
    """`mserve start --servable add --grpc-port P [--workers N]`, quiet."""

    def __init__(self, workers: int):
        self.grpc_port = free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"
        self.name = "mserve, one process" if workers == 0 else f"mserve, {workers} front-ends + device"
        self.log = tempfile.TemporaryFile()
        mserve = Path(sys.executable).with_name("mserve")
        command = [str(mserve)] if mserve.exists() else [sys.executable, "-m", "mserve.cli"]
        self.proc = subprocess.Popen(
            [*command, "start", "--servable", "add", "--port", str(free_port()), "--grpc-port", str(self.grpc_port),
             "--workers", str(workers), "--no-access-log", "--log-level", "error"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, "NO_COLOR": "1"},
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "serving on" in line:
                break
        else:
            self.log.seek(0)
            raise RuntimeError(f"mserve start failed: {self.log.read().decode()[-2000:]}")
        self.pid = self.proc.pid  # with --workers, the workers are its children

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class MindSporeServer:
    """MindSpore Serving 2.0.2's add example (the anchor), gRPC on a free port."""

    name = "MindSpore Serving 2.0.2"

    def __init__(self):
        self.target = f"127.0.0.1:{free_port()}"
        self.env = dict(os.environ, MSS_GRPC_ADDR=self.target, MSS_RESTFUL_ADDR=f"127.0.0.1:{free_port()}")
        subprocess.run(["bash", str(ANCHOR / "start_add.sh")], env=self.env, check=True, capture_output=True)
        pidfile = Path(os.environ.get("MSS_ROOT", Path(tempfile.gettempdir()) / "msserving")) / "server.pid"
        self.pid = int(pidfile.read_text())  # the master; its worker process is its child

    def stop(self) -> None:
        subprocess.run(["bash", str(ANCHOR / "stop_add.sh")], env=self.env, capture_output=True)


class _Context:
    """The few ServicerContext calls Predict makes, for timing the handler alone."""

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, metadata: tuple) -> None:
        pass

    def peer(self) -> str:
        return "in-process"


def handler_cpu(calls: int = 20000) -> float:
    """CPU µs per add call through mserve's servicer in this process, without grpcio:
    parse the request, Predict (decode, pipeline, JAX call, reply), serialize."""
    from mserve import server
    from mserve.protocol import ms_service_pb2 as pb
    from mserve.serving.dataplane import Dataplane
    from mserve.serving.reload import RequestEpochs
    from mserve.transport.grpc import PredictServicer

    server.start_servables(server.ServableStartConfig(REPO / "servables", "add"))
    try:
        servicer, context, raw = PredictServicer(Dataplane(server.registry()), RequestEpochs()), _Context(), add_request()
        for i in range(calls // 10 + calls):
            if i == calls // 10:
                started = time.thread_time()
            reply = servicer.Predict(pb.PredictRequest.FromString(raw), context).SerializeToString()
        assert reply_ok(reply)
        return (time.thread_time() - started) / calls * 1e6
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    parser.add_argument("--concurrency", default="1,4,16", help="callers in flight, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="front-end processes of the second mserve server")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes (at most the concurrency)")
    parser.add_argument("--mindspore", action="store_true", help="also measure MindSpore Serving 2.0.2 (the anchor)")
    parser.add_argument("--bare", action="store_true", help="also measure a bare grpcio server (constant reply)")
    parser.add_argument("--tiny", action="store_true", help="the smallest run (one 0.5 s row per server): checks that it runs")
    args = parser.parse_args()
    if args.tiny:
        args.seconds, args.concurrency, args.clients = 0.5, "1", 1
    levels = [int(c) for c in args.concurrency.split(",")]

    servers: list = []
    try:
        if args.mindspore:
            servers.append(MindSporeServer())
        servers.append(MserveServer(0))
        if args.workers > 0:
            servers.append(MserveServer(args.workers))
        if args.bare:
            servers.append(BareGrpcServer())
        rows = []
        for c in levels:
            for s in servers:
                used = tree_cpu(s.pid)
                result = drive(s.target, c, args.seconds, args.clients)
                calls = result["rps"] * (args.seconds + WARMUP)  # the warm-up's calls used CPU too
                result["cpu_us"] = (tree_cpu(s.pid) - used) / calls * 1e6 if calls else float("nan")
                rows.append((s.name, c, result))
    finally:
        for s in servers:
            s.stop()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"python {platform.python_version()}; load generator: {args.clients} processes of grpc.aio callers "
          f"(one channel each), {args.seconds:g}s per row after {WARMUP:g}s warm-up")
    print("server CPU: CPU time of the server's processes per call (approximate: warm-up calls counted at the"
          " measured rate)")
    print(f"{'server':<28} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/call':>11} {'errors':>6}")
    for name, c, r in rows:
        print(f"{name:<28} {c:>4} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['cpu_us']:>11.0f}"
              f" {r['errors']:>6}")
    # Last: it loads JAX into this process, which must not fork load generators after it.
    print(f"\nmserve's Predict handler alone, in-process (no grpcio): "
          f"{handler_cpu(200 if args.tiny else 20000):.0f} µs CPU per call")
    if args.mindspore:
        print("\nmserve / MindSpore Serving (req/s):")
        anchor = {c: r["rps"] for name, c, r in rows if name == MindSporeServer.name}
        for name, c, r in rows:
            if name != MindSporeServer.name and anchor.get(c):
                print(f"  {name:<26} c{c:<3} {r['rps'] / anchor[c]:.2f}x")


if __name__ == "__main__":
    main()
