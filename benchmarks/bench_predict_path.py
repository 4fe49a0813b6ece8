"""What one predict costs inside the process, without HTTP, and what a thread hand-off adds.

    .venv/bin/python benchmarks/bench_predict_path.py [--calls 10000]

Loads the bundled ``add`` and ``lenet`` (batching off) in this process, takes the WSGI
app that `start_restful_server` serves, and calls it with a prepared request:

* directly, in a loop (the predict path's own cost: decode, pipeline, model, encode);
* handed to another thread and waited for, one call at a time (what Waitress's
  worker pool adds to every request it does not run on its I/O thread);

and prints wall and CPU µs per call. It then runs itself again with
``MSERVE_JAX_CPU_ASYNC=1`` to show what JAX's asynchronous CPU dispatch costs (the
setting is read when JAX starts, so it needs a process of its own). Numbers are for
comparing rows of one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serving import ADD_BODY, lenet_body  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(call, calls: int) -> tuple[float, float]:
    for _ in range(calls // 10):
        call()
    wall, cpu = time.perf_counter(), _cpu()
    for _ in range(calls):
        call()
    return (time.perf_counter() - wall) / calls * 1e6, (_cpu() - cpu) / calls * 1e6


def _handed_off(call):
    """``call`` run by another thread, the caller waiting for each result."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        while todo.get():
            call()
            done.put(True)

    threading.Thread(target=worker, daemon=True).start()

    def run() -> None:
        todo.put(True)
        done.get()

    return run


def measure(calls: int) -> list[tuple[str, float, float]]:
    from mserve import server

    server.use_processes("single")  # models and HTTP in this process: the app is callable here
    server.start_servables([
        server.ServableStartConfig(str(REPO / "servables"), "add"),
        server.ServableStartConfig(str(REPO / "servables"), "lenet", batching=False),
    ])
    started = server.start_restful_server("127.0.0.1:0", inline_max_ms=0)
    app = started.transport.app.app  # the WSGI app inside the transport's in-flight counter
    try:
        def request(path: str, body: bytes):
            def call() -> None:
                environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
                           "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1"}
                app(environ, lambda status, headers, exc_info=None: None)
            return call

        add = request("/model/add:add_common", ADD_BODY.encode())
        lenet = request("/model/lenet:predict", lenet_body().encode())
        return [
            ("add predict, called directly", *_measure(add, calls)),
            ("add predict, handed to a thread and back", *_measure(_handed_off(add), calls)),
            ("lenet predict, called directly", *_measure(lenet, calls // 2)),
        ]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the child's output
    args = parser.parse_args()
    rows = measure(args.calls)
    if args.json:
        print(json.dumps(rows))
        return
    child = subprocess.run(
        [sys.executable, __file__, "--calls", str(args.calls), "--json"],
        env={**os.environ, "MSERVE_JAX_CPU_ASYNC": "1"}, capture_output=True, text=True, check=True,
    )
    rows += [(f"{name} (JAX async CPU dispatch)", wall, cpu)
             for name, wall, cpu in json.loads(child.stdout.strip().splitlines()[-1])]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'in-process predict':<68} {'wall µs':>9} {'CPU µs':>9}")
    for name, wall, cpu in rows:
        print(f"{name:<68} {wall:>9.1f} {cpu:>9.1f}")


if __name__ == "__main__":
    main()
