"""Serving throughput, latency, batch sizes and memory: mserve's process architecture
against MindSpore Serving and against mserve before device processes.

    .venv/bin/python benchmarks/bench_serving.py [--seconds 5] [--mindspore] [--only add|cost|lenet|mlp|memory]
    .venv/bin/python benchmarks/bench_serving.py --only cost --mindspore --rounds 3   # the cost of one request
    .venv/bin/python benchmarks/bench_serving.py --tiny                               # every group, smallest size

Rows (one run, so they share the machine's noise; compare rows, not runs):

* cost: server CPU per request (the whole process tree, from /proc) next to req/s
  and latency, for the default ``mserve start --servable add`` over REST, gRPC and
  HTTPS and (``--mindspore``) MindSpore Serving's add, all running side by side and
  measured in alternating rounds (medians of ``--rounds``); ``--against REF`` adds
  the mserve of another commit, ``--variant NAME=FLAGS`` an mserve with other flags
  (see benchmarks/cost_compare.py).
* add: MindSpore Serving 2.0.2's add example (``--mindspore``, from
  ../shared/anchors/mindspore_serving after its setup.sh) and the default
  ``mserve start`` (no flags but the port: front-ends, a device process, the
  bundled servables, access log on) at 1, 4 and 16 connections, then the ratio.
* lenet (PNG Python stage) and mlp (weight-heavy, batching on) at 32 connections:
  device processes with 1 and 2 front-ends (``server.start_servables`` +
  ``start_restful_server(workers=N)``, what a start script gets) against "legacy":
  N complete servers, each loading the models (``--workers N`` before device
  processes), with the average batch size of each (from ``/metrics``).
* memory: RSS and PSS of the whole process tree with 1 and 4 front-ends, serving a
  servable with 256 MiB of weights, against legacy (which copies them N times).

Load comes from ``wrk`` (Debian's; keep-alive POSTs, one thread) on the same cores.
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
# ../shared beside the checkout (/work/main), or two levels up from a worktree (/work/wt/issueN)
ANCHOR = next(
    (p / "shared" / "anchors" / "mindspore_serving" for p in (REPO.parent, REPO.parent.parent)
     if (p / "shared" / "anchors" / "mindspore_serving").is_dir()),
    REPO.parent / "shared" / "anchors" / "mindspore_serving",
)


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
        mode: str = "devices", env: dict | None = None, **config: object,
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
        self.pool = WorkerPool(configs, sock, workers, restful=restful, log_level=40, env=env)
        self.pool.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def pids(self) -> list[int]:
        """Every process of this server (the benchmark's own process excluded): the
        processes this benchmark started, one server running at a time."""
        from proc_cpu import descendants

        return descendants(os.getpid())

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


def metric_sum(url: str, name: str, servable: str) -> float:
    """The sum of a metric's samples for ``servable`` in a /metrics scrape."""
    text = requests_get(url + "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'servable="{servable}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def requests_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read().decode()


def batched_run(server: "Server", path: str, body: str, servable: str, connections: int, seconds: int) -> dict:
    """A wrk run plus the average batch size of the device calls it caused."""
    before = [metric_sum(server.url(""), f"mserve_batch_size_{k}", servable) for k in ("sum", "count")]
    result = wrk(server.url(path), body, connections, seconds)
    after = [metric_sum(server.url(""), f"mserve_batch_size_{k}", servable) for k in ("sum", "count")]
    calls = after[1] - before[1]
    result["batch"] = (after[0] - before[0]) / calls if calls else float("nan")
    return result


class Started:
    """``mserve start`` as a subprocess, with nothing but ``--port`` (and ``extra``)."""

    def __init__(self, extra: tuple[str, ...] = ()):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mserve.cli", "start", "--port", str(self.port), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if '"ready":true' in requests_get(self.url("/ready")):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("mserve start did not get ready in 120 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.send_signal(__import__("signal").SIGTERM)
        self.proc.wait(60)


def tree_memory(pids: list[int]) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over ``pids`` (from /proc/PID/smaps_rollup)."""
    rss = pss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


HEAVY_CONFIG = """
import jax.numpy as jnp
from mserve import register


def predict(params, x):
    return x @ params["w"][:, :16]


model = register.declare_model(model_file="weights.npz", model_format="jax_function", with_batch_dim=True,
                               options={"function": predict, "input_specs": [("b, 4096", "float32")]})


@register.register_method(output_names=["y"])
def run(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def write_heavy_servable(root: Path, mib: int = 256) -> None:
    """A servable whose model holds ``mib`` MiB of float32 weights."""
    (root / "heavy" / "1").mkdir(parents=True)
    (root / "heavy" / "servable_config.py").write_text(HEAVY_CONFIG)
    w = np.random.default_rng(0).standard_normal((4096, mib * 1024 * 1024 // (4096 * 4)), dtype=np.float32)
    np.savez(root / "heavy" / "1" / "weights.npz", w=w)


def memory_rows(mib: int = 256, counts: tuple[int, ...] = (1, 4),
                modes: tuple[str, ...] = ("devices", "legacy")) -> list[tuple[str, dict]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_heavy_servable(Path(tmp), mib)
        for mode in modes:
            for workers in counts:
                srv = Server("heavy", workers, root=Path(tmp), mode=mode, max_batch_size=4)
                try:
                    time.sleep(1.0)
                    rss, pss = tree_memory(srv.pids())
                finally:
                    srv.stop()
                what = "front-end(s) + 1 device process" if mode == "devices" else "complete server(s), legacy"
                rows.append((f"memory: {mib} MiB weights, {workers} {what}", {"rss": rss, "pss": pss}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--mindspore", action="store_true", help="also measure MindSpore Serving's add (anchor)")
    parser.add_argument("--only", choices=["add", "cost", "lenet", "mlp", "memory"], help="run one group")
    parser.add_argument("--tiny", action="store_true",
                        help="every group at the smallest size (1 s rows, fewer configurations): checks that it runs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the cost group (medians)")
    parser.add_argument("--concurrency", default="4,16", help="connections of the cost group, comma-separated")
    parser.add_argument("--protocols", default="REST,gRPC,HTTPS", help="what the cost group measures, comma-separated")
    parser.add_argument("--against", help="cost group: also run mserve as of this git ref (before/after a change)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="cost group: also run `mserve start FLAGS` as 'mserve NAME' (repeatable)")
    parser.add_argument("--mserve-flags", default="", help="extra `mserve start` flags for the cost group")
    args = parser.parse_args()
    if args.tiny:  # (HTTPS at tiny size: bench_tls.py)
        args.seconds, args.rounds, args.concurrency, args.protocols = 1, 1, "4", "REST,gRPC"
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    if args.only in (None, "cost"):
        from cost_compare import compare

        levels = [int(c) for c in args.concurrency.split(",")]
        protocols = tuple(p.strip() for p in args.protocols.split(","))
        print("\n".join(compare(args.rounds, args.seconds, levels, args.mindspore, ADD_BODY,
                                 tuple(args.mserve_flags.split()), protocols, args.against,
                                 {n: tuple(f.split()) for n, _, f in (v.partition("=") for v in args.variant)},
                                 warm_up=not args.tiny)))
        if args.only == "cost":
            return
    import logging

    logging.getLogger("mserve").setLevel(logging.ERROR)  # the servers started here: no access log
    from mserve.backends.jax_runtime import prefer_sync_cpu_dispatch

    prefer_sync_cpu_dispatch()  # the raw loops below run like the server's programs

    rows: list[tuple[str, dict]] = []
    ratios: list[str] = []
    if args.only in (None, "add"):
        levels = [4] if args.tiny else [1, 4, 16]
        anchor = dict(mindspore_add(args.seconds, levels)) if args.mindspore else {}
        rows += list(anchor.items())
        started = Started()
        try:
            for c in levels:
                result = wrk(started.url("/model/add:add_common"), ADD_BODY, c, args.seconds)
                rows.append((f"default `mserve start` add, c{c}", result))
                ms = anchor.get(f"MindSpore Serving 2.0.2 add, c{c}")
                if ms:
                    ratios.append(f"add c{c}: mserve {result['rps']:.0f} / MindSpore {ms['rps']:.0f} = "
                                  f"{result['rps'] / ms['rps']:.2f}x")
        finally:
            started.stop()
    groups = []
    if args.only in (None, "lenet"):
        groups.append(("lenet", SERVABLES, "/model/lenet:predict", lenet_body(), None))
    if args.only in (None, "mlp"):
        groups.append(("mlp", None, "/model/mlp:predict", mlp_body(), write_mlp_servable))
    for name, root, path, body, write in groups:
        with tempfile.TemporaryDirectory() as tmp:
            if write is not None:
                write(Path(tmp))
                root = Path(tmp)
            plans = (("devices", 1),) if args.tiny else (
                ("legacy", 1), ("legacy", 2), ("devices", 1), ("devices", 2))
            for mode, workers in plans:
                srv = Server(name, workers, root=root, mode=mode, max_batch_size=32,
                             **({"env": _metrics_env(tmp)} if mode == "legacy" else {}))
                label = (f"{workers} front-end(s) + device process" if mode == "devices"
                         else f"legacy --workers {workers}")
                try:
                    rows.append((f"{name} batching on, {label}, c32", batched_run(srv, path, body, name, 32, args.seconds)))
                finally:
                    srv.stop()
        if name == "lenet":
            rows.append(("raw jitted LeNet, batch 32, in-process loop (images/s)", raw_lenet(32, args.seconds)))
    if args.only in (None, "memory"):
        rows += memory_rows(16, (1,), ("devices",)) if args.tiny else memory_rows()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"python {platform.python_version()}; load generator: wrk -t1, keep-alive, {args.seconds:g}s per row")
    print(f"{'scenario':<66} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'batch':>6}")
    for label, r in rows:
        if "rss" in r:
            print(f"{label:<66} RSS {r['rss']:>7.0f} MiB, PSS {r['pss']:>7.0f} MiB")
            continue
        batch = f"{r['batch']:>6.2f}" if "batch" in r else ""
        print(f"{label:<66} {r['rps']:>8.0f} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['errors']:>4} {batch}")
    for line in ratios:
        print(line)


def _metrics_env(tmp: str) -> dict[str, str]:
    """Legacy workers share a metrics directory, so /metrics sums their batches."""
    folder = Path(tmp) / f"metrics-{time.monotonic_ns()}"
    folder.mkdir()
    return {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}


if __name__ == "__main__":
    main()
