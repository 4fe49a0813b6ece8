"""A model too big for one process's memory limit, served over 2 and 3 hosts.

    .venv/bin/python benchmarks/bench_distributed.py [--tiny] [--requests 200] [--concurrency 4]

An MLP (``x @ w1 -> tanh -> @ w2``) whose weights alone come close to the
per-process memory limit (``--limit-mb``, ``RLIMIT_DATA``, which JAX's allocations
count against) is served:

* unsharded, loaded as a server loads it, in one process under the limit: it does
  not load (the row says why);
* unsharded, in one process without the limit (the baseline where it fits);
* sharded over 2 and 3 `mserve agent` processes on this machine (one CPU device
  each, gloo), each agent and its JAX process under the limit, each holding its
  share of the weights.

Each row: requests/s and latency (p50, p99) of ``--requests`` single-instance
REST predicts from ``--concurrency`` client threads, and the weights and resident
memory each JAX process holds. This process is the main host (the server API), so
the hosts' reports come straight from the group. All processes share this
machine's cores: the rows show what spanning processes costs or gains here, not
what separate machines (each with its own cores and memory) would do.
``--tiny``: a small model, a few requests, no limit (CI: the path works).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CONFIG = """
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mserve import register


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


options = {{"function": mlp, "input_specs": [("b, {d_in}", "float32")]}}
if {sharded}:
    options["sharding"] = {{"mesh": "model", "params": {{"w1": P(None, "model"), "w2": P("model", None)}}}}
model = register.declare_model(model_file="mlp.safetensors", model_format="jax_function", options=options)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def write_servables(root: Path, d_in: int, hidden: int, d_out: int) -> dict[str, np.ndarray]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    params = {"w1": (rng.standard_normal((d_in, hidden), np.float32) / np.sqrt(d_in)).astype(np.float32),
              "w2": (rng.standard_normal((hidden, d_out), np.float32) / np.sqrt(hidden)).astype(np.float32)}
    for name, sharded in (("mlp", False), ("mlp_sharded", True)):
        folder = root / name / "1"
        folder.mkdir(parents=True)
        (root / name / "servable_config.py").write_text(CONFIG.format(d_in=d_in, sharded=sharded))
        save_file(params, str(folder / "mlp.safetensors"))
    return params


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def limited(argv: list[str], limit_mb: int) -> list[str]:
    """``argv`` (a python -m command) run under RLIMIT_DATA, inherited by its children."""
    if not limit_mb:
        return argv
    setup = ("import resource, runpy, sys; n = %d << 20; resource.setrlimit(resource.RLIMIT_DATA, (n, n)); "
             "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')") % limit_mb
    return [sys.executable, "-c", setup, *argv[2:]]


def load(url: str, body: bytes, requests_total: int, concurrency: int) -> dict[str, float]:
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    per_thread = max(1, requests_total // concurrency)

    def client() -> None:
        session = requests.Session()
        for _ in range(per_thread):
            started = time.perf_counter()
            reply = session.post(url, data=body, timeout=120)
            latencies.append(time.perf_counter() - started)
            if reply.status_code != 200:
                errors.append(reply.text[:200])

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    ms = np.array(latencies) * 1000
    return {"rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def unsharded_under_limit(root: Path, limit_mb: int) -> str:
    """Load the unsharded model as one server process does (``server.start_servables``)
    in a process under the limit; what happened, in a few words."""
    script = ("from mserve import server; import sys; "
              "server.start_servables(server.ServableStartConfig(sys.argv[1], 'mlp', max_batch_size=8)); "
              "print('LOADED', flush=True); server.stop()")
    argv = [sys.executable, "-c", script, str(root)]
    if limit_mb:
        argv = [sys.executable, "-c", "import resource, sys; n = %d << 20; "
                "resource.setrlimit(resource.RLIMIT_DATA, (n, n)); sys.argv = sys.argv[1:]; exec(sys.argv[0])"
                % limit_mb, script, str(root)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, MSERVE_PROCESSES="single"))
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        return "did not finish loading within 300 s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if "LOADED" in out:
        return "loads (the limit is too high to show anything: raise --hidden)"
    lines = [line for line in err.splitlines() if "memory" in line.lower() or "RESOURCE" in line]
    return f"does not load (exit {proc.returncode}): {(lines[-1] if lines else err.strip()[-160:]).strip()[:200]}"


def serve_unsharded(root: Path, body: bytes, args: argparse.Namespace) -> dict[str, float]:
    from mserve import server

    server.start_servables(server.ServableStartConfig(root, "mlp", max_batch_size=8))
    try:
        rest = server.start_restful_server("127.0.0.1:0")
        row = load(f"{rest.url}/model/mlp:predict", body, args.requests, args.concurrency)
        from mserve.distributed.shards import resident_bytes

        row["rss_mb"] = resident_bytes() / 2**20
        return row
    finally:
        server.stop()


def serve_sharded(root: Path, body: bytes, hosts: int, args: argparse.Namespace) -> dict[str, float]:
    from mserve import server
    from mserve.distributed.coordinator import GroupSettings
    from mserve.distributed.serving import start_group, stop_group
    group = start_group(GroupSettings(f"127.0.0.1:{free_port()}", hosts=hosts, wait_agents=600))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    agents = [
        subprocess.Popen(limited([sys.executable, "-m", "mserve.cli", "agent", "--distributed-address", group.address,
                                  "--host-index", str(i), "--log-level", "warning"], args.limit_mb),
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(hosts)
    ]
    try:
        started = time.perf_counter()
        server.start_servables(server.ServableStartConfig(root, "mlp_sharded", max_batch_size=8))
        load_s = time.perf_counter() - started
        rest = server.start_restful_server("127.0.0.1:0")
        row = load(f"{rest.url}/model/mlp_sharded:predict", body, args.requests, args.concurrency)
        reports = group.process_reports()
        row["load_s"] = load_s
        row["weights_mb_per_host"] = [round(r["bytes"] / 2**20, 1) for r in reports.values()]
        row["rss_mb_per_host"] = [round(r["rss_bytes"] / 2**20, 1) for r in reports.values()]
        row["batches"] = group.batches
        return row
    finally:
        server.stop()
        stop_group(group)
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model and a few requests, no memory limit")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=122880, help="hidden units (a multiple of 6)")
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--limit-mb", type=int, default=900, help="RLIMIT_DATA of each JAX process (0: none)")
    parser.add_argument("--hosts", default="2,3")
    args = parser.parse_args()
    if args.tiny:
        args.hidden, args.d_in, args.limit_mb, args.requests = 96, 32, 0, 20
    os.environ.setdefault("MSERVE_PROCESSES", "single")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = write_servables(root, args.d_in, args.hidden, 32)
        weights_mb = sum(a.nbytes for a in params.values()) / 2**20
        x = np.random.default_rng(1).standard_normal(args.d_in).astype(np.float32)
        body = json.dumps({"instances": [{"x": x.tolist()}]}).encode()
        print(f"MLP {args.d_in} -> {args.hidden} -> 32: {weights_mb:.1f} MiB of weights; "
              f"limit per JAX process: {args.limit_mb or 'none'} MiB; {args.requests} requests, "
              f"{args.concurrency} client threads", flush=True)
        results: dict[str, object] = {"weights_mb": round(weights_mb, 1), "limit_mb": args.limit_mb}
        if args.limit_mb:
            results["unsharded_under_limit"] = unsharded_under_limit(root, args.limit_mb)
            print(f"unsharded, 1 process, under the limit: {results['unsharded_under_limit']}", flush=True)
        row = serve_unsharded(root, body, args)
        results["unsharded_no_limit"] = row
        print(f"unsharded, 1 process, no limit: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
              f"p99 {row['p99_ms']:.1f} ms, RSS {row['rss_mb']:.0f} MiB", flush=True)
        for hosts in [int(h) for h in args.hosts.split(",")]:
            row = serve_sharded(root, body, hosts, args)
            results[f"sharded_{hosts}_hosts"] = row
            print(f"sharded over {hosts} agent processes: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.1f} ms, "
                  f"p99 {row['p99_ms']:.1f} ms; weights per host {row['weights_mb_per_host']} MiB, "
                  f"RSS per host {row['rss_mb_per_host']} MiB; group ready in {row['load_s']:.1f} s", flush=True)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
