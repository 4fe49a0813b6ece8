"""Faults and floods against the default ``mserve start`` (front-end processes and a
device process), on loopback: what a stop, a connection flood or big failed
requests cost the clients.

* stop: requests in flight (more than the threads, so some wait for one; all of
  them fit in the drain timeout) when SIGTERM arrives, and fresh clients during the
  drain. Reports requests lost (no
  answer, a reset: must be 0; a refused connection or a 503 for a newcomer is
  fine) and how long the stop took against ``--drain-timeout``.
* flood: ``--flood`` idle connections, then as many slowloris heads (a request head
  that never ends), held open while fresh clients post the add request one at a
  time. Reports how long the flood took to be accepted and the fresh clients' wait
  (p50, p99, max) and failures.
* memory: the front-ends' RSS before and after big requests that fail: bodies over
  ``--max-instances`` (413) and big tensors the model refuses (add_cast).

    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_faults.py
    .venv/bin/python benchmarks/bench_faults.py --tiny      # seconds, small numbers (CI)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ADD_BODY = json.dumps({"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]})
WAIT_METHOD = '''

import time as _time


def _hold(seconds):
    _time.sleep(float(seconds))
    return seconds


@register.register_method(output_names=["held"])
def wait(seconds):
    return register.add_stage(_hold, seconds, outputs_count=1)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_servables(root: Path) -> None:
    """The bundled add servable, plus a ``wait`` method (a Python stage that sleeps)."""
    import mserve.servables  # the installed mserve's (the one the server runs)

    shutil.copytree(Path(mserve.servables.__file__).parent / "add", root / "add")
    config = root / "add" / "servable_config.py"
    config.write_text(config.read_text() + WAIT_METHOD)


class Server:
    def __init__(self, root: Path, *args: str):
        self.port = free_port()
        self.log = open(root / f"server-{self.port}.log", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mserve.cli", "start", str(root), "--port", str(self.port), "--no-access-log",
             *args], stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"}, cwd=root,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("the server exited:\n" + self.output()[-3000:])
            if post(self.port, "/ready", None, timeout=2)[1] == 200 and "serving on" in self.output():
                return
            time.sleep(0.2)
        raise SystemExit("the server did not get ready:\n" + self.output()[-3000:])

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def frontends(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    line = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and b"mserve.runtime.frontend_role" in line:
                    pids.append(int(entry))
        return pids

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def post(port: int, path: str, body: str | bytes | None, timeout: float = 30) -> tuple[str, int | None]:
    """One request on a fresh connection: ("ok", status), ("refused", None) or ("lost", None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return "ok", response.status
    except ConnectionRefusedError:
        return "refused", None
    except (OSError, http.client.HTTPException):
        return "lost", None
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --------------------------------------------------------------------------- experiments


def stop_experiment(root: Path, args: argparse.Namespace) -> dict:
    server = Server(root, "--workers", str(args.workers), "--threads", "2", "--drain-timeout", str(args.drain))
    try:
        results: list[tuple[str, int | None]] = []
        body = json.dumps({"instances": [{"seconds": args.hold}]})
        threads = [threading.Thread(target=lambda: results.append(post(server.port, "/model/add:wait", body)))
                   for _ in range(args.inflight)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        newcomers: list[tuple[str, int | None]] = []
        while server.proc.poll() is None and time.monotonic() - started < args.drain + 30:
            newcomers.append(post(server.port, "/model/add:add_common", ADD_BODY, timeout=args.drain + 10))
            time.sleep(0.05)
        server.proc.wait(args.drain + 30)
        took = time.monotonic() - started
        for t in threads:
            t.join(60)
    finally:
        server.proc.wait(args.drain + 30)
        said = server.output()
        server.close()
    if any(r[0] == "lost" for r in results + newcomers):  # what the server said, to tell why
        print("stop: requests lost; the server's log:\n" + said[-6000:], file=sys.stderr, flush=True)
    return {
        "inflight": len(results), "inflight_lost": sum(1 for r in results if r != ("ok", 200)),
        "inflight_outcomes": {f"{k}{'' if s is None else ' ' + str(s)}": results.count((k, s)) for k, s in set(results)},
        "newcomers": len(newcomers),
        "newcomers_lost": sum(1 for r in newcomers if r[0] == "lost"),
        "newcomers_refused": sum(1 for r in newcomers if r[0] == "refused"),
        "newcomers_503": sum(1 for r in newcomers if r == ("ok", 503)),
        "stop_s": round(took, 2), "drain_timeout_s": args.drain,
    }


def hold_connections(port: int, count: int, slowloris: bool) -> tuple[list[socket.socket], float]:
    """``count`` connections held open (a request head that never ends, with
    ``slowloris``); returns them and the seconds until the last was accepted."""
    held = []
    started = time.monotonic()
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            break
        if slowloris:
            s.sendall(b"POST /model/add:add_common HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
    return held, time.monotonic() - started


def fresh_clients(port: int, count: int) -> tuple[list[float], int]:
    waits, failed = [], 0
    for _ in range(count):
        t = time.monotonic()
        outcome = post(port, "/model/add:add_common", ADD_BODY, timeout=10)
        if outcome == ("ok", 200):
            waits.append(time.monotonic() - t)
        else:
            failed += 1
        time.sleep(0.02)
    return waits, failed


def flood_experiment(root: Path, args: argparse.Namespace) -> dict:
    server = Server(root, "--workers", str(args.workers))
    report = {"held": args.flood}
    try:
        for kind in ("idle", "slowloris"):
            waits: list[float] = []
            failed = 0
            held: list[socket.socket] = []
            flood = threading.Thread(target=lambda: held.extend(hold_connections(server.port, args.flood,
                                                                                 kind == "slowloris")[0]))
            started = time.monotonic()
            flood.start()
            while flood.is_alive():  # fresh clients while the flood arrives
                w, f = fresh_clients(server.port, 1)
                waits += w
                failed += f
            took = time.monotonic() - started
            w, f = fresh_clients(server.port, args.fresh)  # and while it is held
            waits += w
            failed += f
            report[kind] = {
                "flood_s": round(took, 2), "fresh": len(waits) + failed, "fresh_failed": failed,
                "fresh_p50_ms": round(percentile(waits, 0.5) * 1000, 1),
                "fresh_p99_ms": round(percentile(waits, 0.99) * 1000, 1),
                "fresh_max_ms": round(max(waits, default=float("nan")) * 1000, 1),
            }
            for s in held:
                s.close()
            time.sleep(1.0)
    finally:
        server.close()
    return report


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 1024, 1)


def memory_experiment(root: Path, args: argparse.Namespace) -> dict:
    server = Server(root, "--workers", "1", "--max-instances", str(args.max_instances))
    try:
        frontends = server.frontends()
        post(server.port, "/model/add:add_common", ADD_BODY)
        before = rss_mb(frontends)
        many = json.dumps({"instances": [{"x1": [[1.0]], "x2": [[1.0]]}] * args.big_instances})
        side = int((args.big_mb * 1024 * 1024 / 8) ** 0.5)  # ~big_mb of JSON floats in one tensor
        row = "[" + ",".join(["1.5"] * side) + "]"
        tensor = "[" + ",".join([row] * side) + "]"
        big = '{"instances": [{"x1": %s, "x2": %s}]}' % (tensor, tensor)
        statuses, times = [], {"instances": [], "tensor": []}
        for i in range(args.big_requests):
            t = time.monotonic()
            statuses.append(post(server.port, "/model/add:add_common" if i % 2 else "/model/add:add_cast",
                                 many if i % 2 else big, timeout=120)[1])
            times["instances" if i % 2 else "tensor"].append(time.monotonic() - t)
        time.sleep(0.5)
        after = rss_mb(frontends)
    finally:
        server.close()
    return {
        "requests": args.big_requests, "statuses": sorted(set(statuses), key=str),
        "body_mb": {"instances": round(len(many) / 2**20, 1), "tensor": round(len(big) / 2**20, 1)},
        "answer_s_max": {k: round(max(v, default=0), 2) for k, v in times.items()}, "frontend_rss_mb_before": before, "frontend_rss_mb_after": after,
        "frontend_rss_mb_growth": round(after - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small numbers, seconds in all (CI)")
    parser.add_argument("--only", choices=("stop", "flood", "memory"), action="append", help="run only these")
    parser.add_argument("--workers", type=int, default=2, help="front-end processes")
    parser.add_argument("--drain", type=float, default=5.0, help="--drain-timeout of the stop experiment")
    parser.add_argument("--inflight", type=int, default=16, help="requests in flight at SIGTERM")
    parser.add_argument("--hold", type=float, default=0.5, help="seconds each in-flight request takes")
    parser.add_argument("--flood", type=int, default=1000, help="idle connections (then slowloris heads) held")
    parser.add_argument("--fresh", type=int, default=50, help="fresh clients once the flood is held")
    parser.add_argument("--max-instances", type=int, default=1000)
    parser.add_argument("--big-instances", type=int, default=1_000_000, help="instances of the over-limit body")
    parser.add_argument("--big-mb", type=float, default=50.0, help="MB of JSON in the big tensor body")
    parser.add_argument("--big-requests", type=int, default=10)
    args = parser.parse_args()
    if args.tiny:
        args.drain, args.inflight, args.hold, args.flood, args.fresh = 3.0, 8, 0.5, 60, 10
        args.big_instances, args.big_mb, args.big_requests = 20_000, 2.0, 2
    # The flood's sockets, and the server's: the server raises its own soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.flood + 256)), hard))
    experiments = {"stop": stop_experiment, "flood": flood_experiment, "memory": memory_experiment}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        root = Path(tmp)
        write_servables(root)
        report = {}
        for name in args.only or list(experiments):
            report[name] = experiments[name](root, args)
            print(name, json.dumps(report[name]), flush=True)
    lost = report.get("stop", {}).get("inflight_lost", 0) + report.get("stop", {}).get("newcomers_lost", 0)
    print(f"requests lost at stop: {lost}")
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
