"""Serving throughput and latency: add, LeNet and a weight-heavy MLP (batching on/off), the raw jitted LeNet.

    .venv/bin/python benchmarks/bench_serving.py [--seconds 5] [--workers 2] [--mindspore]

Starts real mserve servers (worker processes on one port, as `mserve start
--workers` does), drives them with `wrk` (Debian's `wrk`; keep-alive POSTs) and prints
one table: requests/s, p50, p99 per scenario, plus the machine it ran on. With
``--mindspore`` it also starts MindSpore Serving's add example from
../shared/anchors/mindspore_serving (after its setup.sh) on the same machine in the
same run, so the two are compared under the same noise. The load generator shares
the CPU with the server: compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SERVABLES = REPO / "servables"
ADD_BODY = '{"instances":[{"x1":[[1.0,2.0],[3.0,4.0]],"x2":[[1.0,2.0],[3.0,4.0]]}]}'
ANCHOR = REPO.parent / "shared" / "anchors" / "mindspore_serving"


def lenet_body(instances: int = 1) -> str:
    request = json.loads((REPO / "sample_data" / "digits" / "predict_request.json").read_text())
    image = request["instances"][0]["image"]
    return json.dumps({"instances": [{"image": image}] * instances})


def wrk(url: str, body: str, connections: int, seconds: int) -> dict[str, float]:
    """One wrk run; returns rps, p50 and p99 (ms)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            "done = function(summary, latency, requests)\n"
            "  io.write(string.format('BAD %d\\n', summary.errors.status + summary.errors.connect"
            " + summary.errors.read + summary.errors.write + summary.errors.timeout))\n"
            "end\n"
        )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout
    os.unlink(script.name)

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = int(re.search(r"^BAD (\d+)", out, re.M).group(1))
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "errors": bad}


class Server:
    """An mserve server on a free port.

    ``mode="devices"``: what `mserve start --workers N` runs now: N front-end
    processes and one device process holding the models. ``mode="legacy"``: N
    complete servers on the port, each loading the models (what `--workers N` meant
    before device processes; the "today" rows of the issue's comparison).
    """

    def __init__(
        self, name: str, workers: int, restful: dict | None = None, root: Path = SERVABLES,
        mode: str = "devices", **config: object,
    ):
        from mserve import server

        self.mode = mode
        configs = [server.ServableStartConfig(str(root), name, **config)]
        if mode == "devices":
            server.use_processes("devices")
            started = server.start_restful_server("127.0.0.1:0", workers=workers, **(restful or {}))
            server.start_servables(configs)
            self.port = started.port
            self.pool = started.transport.pool
            return
        from mserve.transport.http import bind_socket
        from mserve.transport.workers import WorkerPool

        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.pool = WorkerPool(configs, sock, workers, restful=restful, log_level=40)
        self.pool.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def pids(self) -> list[int]:
        """Every process of this server (the benchmark's own process excluded)."""
        from mserve import server

        pids = [p.pid for p in self.pool.procs if p is not None]
        if self.mode == "devices" and server._state.devices is not None:
            pids += list(server._state.devices.pids().values())
        return pids

    def stop(self) -> None:
        if self.mode == "devices":
            from mserve import server

            server.stop(drain_timeout=5)
        else:
            self.pool.stop(drain_timeout=5)


MLP_SIZES = (1024, 2048, 2048, 10)
MLP_CONFIG = """
from mserve import register

model = register.declare_model(model_file="mlp.jaxexport", model_format="jax_export", with_batch_dim=True)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def write_mlp_servable(root: Path) -> None:
    """A weight-heavy model (MLP 1024-2048-2048-10, random weights, 25 MB), where a
    call reads every weight whatever the batch size: what batching is for."""
    import jax
    import jax.numpy as jnp
    from jax import export

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a) for a, b in zip(MLP_SIZES, MLP_SIZES[1:])]

    def mlp(x):
        for w in weights[:-1]:
            x = jax.nn.relu(x @ jnp.asarray(w))
        return x @ jnp.asarray(weights[-1])

    spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {MLP_SIZES[0]}"), jnp.float32)
    (root / "mlp" / "1").mkdir(parents=True)
    (root / "mlp" / "servable_config.py").write_text(MLP_CONFIG)
    (root / "mlp" / "1" / "mlp.jaxexport").write_bytes(export.export(jax.jit(mlp))(spec).serialize())


def mlp_body() -> str:
    x = np.random.default_rng(1).standard_normal(MLP_SIZES[0], dtype=np.float32)
    b64 = __import__("base64").b64encode(x.tobytes()).decode()
    return json.dumps({"instances": [{"x": {"b64": b64, "type": "float32", "shape": [MLP_SIZES[0]]}}]})


def raw_lenet(batch: int, seconds: float) -> dict[str, float]:
    """The ceiling: the jitted LeNet artifact called in a loop at ``batch``."""
    import jax
    from jax import export

    exported = export.deserialize(bytearray((SERVABLES / "lenet" / "1" / "lenet.jaxexport").read_bytes()))
    fn = jax.jit(exported.call)
    x = np.random.default_rng(0).random((batch, 8, 8, 1), dtype=np.float32)
    for _ in range(20):
        np.asarray(fn(x))
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        np.asarray(fn(x))
        calls += 1
    elapsed = time.perf_counter() - start
    return {"rps": calls * batch / elapsed, "p50": elapsed / calls * 1000, "p99": float("nan"), "errors": 0}


def mindspore_add(seconds: float, connections: list[int]) -> list[tuple[str, dict]]:
    env = dict(os.environ, MSS_RESTFUL_ADDR="127.0.0.1:5599", MSS_GRPC_ADDR="")
    subprocess.run(["bash", str(ANCHOR / "start_add.sh")], env=env, check=True, capture_output=True)
    try:
        return [
            (f"MindSpore Serving 2.0.2 add, c{c}", wrk("http://127.0.0.1:5599/model/add:add_common", ADD_BODY, c, seconds))
            for c in connections
        ]
    finally:
        subprocess.run(["bash", str(ANCHOR / "stop_add.sh")], env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="mserve worker processes")
    parser.add_argument("--mindspore", action="store_true", help="also measure MindSpore Serving's add (anchor)")
    parser.add_argument("--only", choices=["add", "lenet", "mlp"], help="run one group")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    from mserve.backends.jax_runtime import prefer_sync_cpu_dispatch

    prefer_sync_cpu_dispatch()  # the raw loops below run like the server's programs

    rows: list[tuple[str, dict]] = []
    if args.only in (None, "add"):
        if args.mindspore:
            rows += mindspore_add(args.seconds, [1, 4, 16])
        # inline_max_ms=0: every request goes through Waitress's worker threads, as
        # before requests could run on the I/O thread (see mserve/inline.py).
        for workers, inline in sorted({(1, 1.0), (args.workers, 1.0), (args.workers, 0.0)}, key=lambda w: (w[0], -w[1])):
            add = Server("add", workers, restful={"inline_max_ms": inline})
            label = "" if inline else ", inline off"
            try:
                for c in (1, 4, 16):
                    rows.append((f"mserve add, {workers} worker(s){label}, c{c}",
                                 wrk(add.url("/model/add:add_common"), ADD_BODY, c, args.seconds)))
            finally:
                add.stop()
    if args.only in (None, "lenet"):
        # Batched versions never run inline; unbatched ones do unless inline is off.
        for batching, inline in ((True, 1.0), (False, 1.0), (False, 0.0)):
            lenet = Server("lenet", args.workers, restful={"inline_max_ms": inline}, batching=batching,
                           max_batch_size=32)
            label = f"batching {'on' if batching else 'off'}" + ("" if inline else ", inline off")
            try:
                for c in (1, 32):
                    rows.append((f"mserve lenet:predict, {label}, c{c}",
                                 wrk(lenet.url("/model/lenet:predict"), lenet_body(), c, args.seconds)))
            finally:
                lenet.stop()
        rows.append(("raw jitted LeNet, batch 32, in-process loop (images/s)", raw_lenet(32, args.seconds)))
        rows.append(("raw jitted LeNet, batch 1, in-process loop (images/s)", raw_lenet(1, args.seconds)))
    if args.only in (None, "mlp"):
        with tempfile.TemporaryDirectory() as tmp:
            write_mlp_servable(Path(tmp))
            for batching in (True, False):
                mlp = Server("mlp", args.workers, root=Path(tmp), batching=batching, max_batch_size=32)
                try:
                    for c in (1, 32):
                        rows.append((f"mserve mlp:predict (weight-heavy), batching {'on' if batching else 'off'}, c{c}",
                                     wrk(mlp.url("/model/mlp:predict"), mlp_body(), c, args.seconds)))
                finally:
                    mlp.stop()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"python {platform.python_version()}; load generator: wrk -t1, keep-alive, {args.seconds:g}s per row")
    print(f"{'scenario':<62} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in rows:
        print(f"{name:<62} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['errors']:>6}")


if __name__ == "__main__":
    main()
