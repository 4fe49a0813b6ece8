"""Soak: minutes of sustained load mixing good and bad requests with connection
floods, against one server process serving HTTP and HTTPS; reports errors, p99 and
the server's RSS over time. Also ``--memory``: RSS around big requests.

The server runs in a subprocess (this file with ``--serve``): the bundled add
servable plus a ``stages`` servable whose methods are quick, slow (past the request
timeout), or raise (ValueError, SystemExit). The load runs in this process:

* good: keep-alive clients posting the add request, over HTTP and HTTPS;
* bad: malformed JSON, wrong shapes, unknown servables, malformed HTTP, oversized
  headers, too many instances, stages that raise or outlive the deadline;
* floods, every ``--flood-every`` seconds for half that time: idle TCP connections,
  slow request heads, half ClientHellos, and TLS connections holding half a request;
  a fresh client measures how long a new connection takes to be answered meanwhile.

Every ``--sample`` seconds one line: good requests served and their p50/p99, bad
requests and whether each got the expected answer, unexpected outcomes (a 500, no
answer, a dropped connection), new-client latency, server RSS. Loopback only.

    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_soak.py --minutes 4
    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_soak.py --memory
    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_soak.py --floods
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADD = "/model/add:add_common"
ADD_BODY = json.dumps({"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}).encode()
ADD_REPLY = {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}

STAGES = """
import time
from mserve import register

def quick(x):
    return x

def nap(x):
    time.sleep(float(x))
    return x

def refuse(x):
    raise ValueError("no thanks")

def leave(x):
    raise SystemExit(1)

@register.register_method(output_names=["y"])
def quick(x):
    return register.add_stage(quick, x, outputs_count=1)

@register.register_method(output_names=["y"])
def nap(x):
    return register.add_stage(nap, x, outputs_count=1)

@register.register_method(output_names=["y"])
def refuse(x):
    return register.add_stage(refuse, x, outputs_count=1)

@register.register_method(output_names=["y"])
def leave(x):
    return register.add_stage(leave, x, outputs_count=1)
"""


# ---------------------------------------------------------------------------- server


def serve(workdir: Path, restful: dict) -> None:
    """The server process: add + stages over HTTP and HTTPS; prints READY http https."""
    import logging

    import trustme

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(REPO / "tests"))
    from mserve import server
    from support import BUNDLED

    (workdir / "stages" / "1").mkdir(parents=True, exist_ok=True)
    (workdir / "stages" / "servable_config.py").write_text(textwrap.dedent(STAGES))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(workdir / "server.crt"))
    cert.private_key_pem.write_to_path(str(workdir / "server.key"))
    try:  # a started server keeps its process alive: stop it on every way out, or the parent waits forever
        server.start_servables([server.ServableStartConfig(BUNDLED, "add"),
                                server.ServableStartConfig(workdir, "stages")])
        plain = server.start_restful_server("127.0.0.1:0", **restful)
        tls = server.start_restful_server(  # a second listener in this process (MindSpore allows one)
            "127.0.0.1:0", ssl_config=server.SSLConfig(str(workdir / "server.crt"), str(workdir / "server.key")),
            additional=True, **restful,
        )
        print(f"READY {plain.port} {tls.port}", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop(drain_timeout=5)


CHILDREN: list[subprocess.Popen] = []  # --serve processes, killed on every exit path (see main)
START_TIMEOUT = 120.0  # seconds a --serve child may take to say READY


def start_server(workdir: Path, restful: dict) -> tuple[subprocess.Popen, int, int]:
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(workdir), "--restful", json.dumps(restful)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    CHILDREN.append(proc)
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        tail = (workdir / "server.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"server did not start: {line!r}; its log ends:\n{tail}")
    _, http_port, https_port = line.split()
    return proc, int(http_port), int(https_port)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------- clients


class Stats:
    """Counters for one sampling window (threads add under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.good_ms: list[float] = []
        self.refused = 0  # good requests answered 503 (shed) or 504 (deadline): allowed under load
        self.bad_ok = 0
        self.unexpected: list[str] = []
        self.new_client_ms: list[float] = []

    def snapshot(self) -> dict:
        with self.lock:
            data = dict(good_ms=self.good_ms, refused=self.refused, bad_ok=self.bad_ok, unexpected=self.unexpected,
                        new_client_ms=self.new_client_ms)
            self.reset()
        return data


def connection(port: int, ctx: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if ctx is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)


def good_client(port: int, ctx: ssl.SSLContext | None, stats: Stats, stop: threading.Event) -> None:
    conn = connection(port, ctx)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn.request("POST", ADD, ADD_BODY, {"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
            ok = response.status == 200 and json.loads(body) == ADD_REPLY
            outcome = None if ok else "refused" if response.status in (503, 504) else f"good request got {response.status}"
        except Exception as exc:  # noqa: BLE001 - counted
            outcome = f"good request: {type(exc).__name__}"
            conn.close()
            conn = connection(port, ctx)
        with stats.lock:
            if outcome is None:
                stats.good_ms.append((time.perf_counter() - started) * 1000)
            elif outcome == "refused":
                stats.refused += 1
            else:
                stats.unexpected.append(outcome)
        time.sleep(0.002)


def _instances(n: int) -> bytes:
    return json.dumps({"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}] * n}).encode()


# (method, path, body, extra headers, statuses that are a right answer)
BAD_REQUESTS = [
    ("POST", ADD, b"{not json", {}, {400}),
    ("POST", ADD, b'{"instances": [{"x1": [1.0], "x2": [[1.0]]}]}', {}, {400}),
    ("POST", "/model/nothere:add_common", ADD_BODY, {}, {404}),
    ("POST", "/model/add:add_common/extra", ADD_BODY, {}, {400, 404}),
    ("GET", ADD, None, {}, {405}),
    ("POST", ADD, _instances(10001), {}, {413, 504}),  # 504: parsing 700 KB took past the 1 s deadline
    ("POST", ADD, ADD_BODY, {"X-Pad": "a" * 70000}, {431}),
    ("POST", "/model/stages:refuse", b'{"instances": [{"x": 1.0}]}', {}, {400}),
    ("POST", "/model/stages:leave", b'{"instances": [{"x": 1.0}]}', {}, {500}),
    ("POST", "/model/stages:nap", b'{"instances": [{"x": 3.0}]}', {}, {504}),
]
RAW_BAD = [
    b"post /model/add:add_common HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /model/a\xffdd:add_common HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /model/add:add_common HTTP/1.1\r\nHost: x\r\nNoColon\r\nContent-Length: 0\r\n\r\n",
    b"POST /model/add:add_common HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
    b"POST /model/add:add_common HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def bad_client(port: int, ctx: ssl.SSLContext | None, stats: Stats, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        if rng.random() < 0.35:
            outcome = raw_bad(port, ctx, rng.choice(RAW_BAD))
        else:
            method, path, body, headers, allowed = rng.choice(BAD_REQUESTS)
            conn = connection(port, ctx)
            try:
                conn.request(method, path, body, headers)
                response = conn.getresponse()
                response.read()
                outcome = None if response.status in allowed or response.status in (503, 504) else (
                    f"{method} {path[:30]} got {response.status}, expected {sorted(allowed)}")
            except Exception as exc:  # noqa: BLE001 - counted
                outcome = f"{method} {path[:30]}: {type(exc).__name__}"
            finally:
                conn.close()
        with stats.lock:
            if outcome is None:
                stats.bad_ok += 1
            else:
                stats.unexpected.append(outcome)
        time.sleep(0.01)


def raw_bad(port: int, ctx: ssl.SSLContext | None, data: bytes) -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
            sock.sendall(data)
            reply = sock.recv(4096)
    except Exception as exc:  # noqa: BLE001 - counted
        return f"raw malformed request: {type(exc).__name__}"
    if not (reply.startswith(b"HTTP/1.") and reply[8:10] == b" 4"):
        return f"raw malformed request got {reply[:20]!r}"
    return None


def flood(http_port: int, https_port: int, ctx: ssl.SSLContext, hold: float, size: int, stats: Stats) -> None:
    """Open ``size`` hostile connections of each kind, hold them ``hold`` seconds
    while probing how fast a new client is answered, then close them."""
    held: list[socket.socket] = []
    try:
        for _ in range(size):
            held.append(socket.create_connection(("127.0.0.1", http_port), timeout=10))  # idle
            s = socket.create_connection(("127.0.0.1", http_port), timeout=10)
            s.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\n")  # slow head
            held.append(s)
            s = socket.create_connection(("127.0.0.1", https_port), timeout=10)
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
            held.append(s)
        for _ in range(max(size // 20, 1)):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", https_port), timeout=10),
                                server_hostname="127.0.0.1")
            s.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nContent-Le")  # half a request
            held.append(s)
    except OSError as exc:
        with stats.lock:
            stats.unexpected.append(f"opening flood connections: {exc}")
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        for port, tls in ((http_port, None), (https_port, ctx)):
            started = time.perf_counter()
            conn = connection(port, tls)
            try:
                conn.request("POST", ADD, ADD_BODY, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                outcome = None if response.status in (200, 503) else f"new client got {response.status}"
            except Exception as exc:  # noqa: BLE001 - counted
                outcome = f"new client during flood: {type(exc).__name__}"
            finally:
                conn.close()
            with stats.lock:
                if outcome is None:
                    stats.new_client_ms.append((time.perf_counter() - started) * 1000)
                else:
                    stats.unexpected.append(outcome)
        time.sleep(0.5)
    for s in held:
        s.close()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def soak(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mserve-soak-") as tmp:
        workdir = Path(tmp)
        restful = {"threads": args.threads, "request_timeout": 1.0, "max_enqueued_requests": args.max_enqueued}
        proc, http_port, https_port = start_server(workdir, restful)
        ctx = ssl.create_default_context(cafile=str(workdir / "ca.pem"))
        stats, stop = Stats(), threading.Event()
        threads = [threading.Thread(target=good_client, args=(http_port, None, stats, stop), daemon=True)
                   for _ in range(args.good)]
        threads += [threading.Thread(target=good_client, args=(https_port, ctx, stats, stop), daemon=True)
                    for _ in range(args.good)]
        threads += [threading.Thread(target=bad_client, args=(port, tls, stats, stop, i), daemon=True)
                    for i, (port, tls) in enumerate([(http_port, None), (https_port, ctx)] * args.bad)]
        print(f"soak: {args.minutes} min, {args.good}+{args.good} good keep-alive clients (HTTP+HTTPS), "
              f"{2 * args.bad} bad clients, flood of {args.flood_size}x3 connections for {args.flood_every / 2:g} s "
              f"every {args.flood_every:g} s; server threads {args.threads}, request_timeout 1 s")
        print(f"{'t s':>5} {'good':>6} {'p50 ms':>7} {'p99 ms':>7} {'503/504':>7} {'bad ok':>6} {'unexpected':>10} "
              f"{'new-client p99 ms':>17} {'RSS MB':>7}")
        for t in threads:
            t.start()
        started = time.monotonic()
        end = started + args.minutes * 60
        next_flood = started + args.flood_every / 2
        flooder: threading.Thread | None = None
        all_good: list[float] = []
        unexpected: dict[str, int] = {}
        rss: list[float] = []
        while time.monotonic() < end:
            time.sleep(args.sample)
            if time.monotonic() >= next_flood and (flooder is None or not flooder.is_alive()):
                flooder = threading.Thread(target=flood, args=(http_port, https_port, ctx, args.flood_every / 2,
                                                               args.flood_size, stats), daemon=True)
                flooder.start()
                next_flood += args.flood_every
            data = stats.snapshot()
            all_good += data["good_ms"]
            for item in data["unexpected"]:
                unexpected[item] = unexpected.get(item, 0) + 1
            rss.append(rss_mb(proc.pid))
            print(f"{time.monotonic() - started:5.0f} {len(data['good_ms']):6d} {pct(data['good_ms'], 0.5):7.1f} "
                  f"{pct(data['good_ms'], 0.99):7.1f} {data['refused']:7d} {data['bad_ok']:6d} {len(data['unexpected']):10d} "
                  f"{pct(data['new_client_ms'], 0.99):17.1f} {rss[-1]:7.0f}", flush=True)
        stop.set()
        for t in threads:
            t.join(5)
        print(f"\ntotal: {len(all_good)} good requests, p50 {pct(all_good, 0.5):.1f} ms, "
              f"p99 {pct(all_good, 0.99):.1f} ms; RSS {rss[0]:.0f} -> max {max(rss):.0f} -> end {rss[-1]:.0f} MB")
        print(f"unexpected outcomes: {sum(unexpected.values())}")
        for text, count in sorted(unexpected.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {count:6d}  {text}")
        proc.stdin.close()
        code = proc.wait(30)
        log_text = (workdir / "server.log").read_text(errors="replace")
        print(f"server log: {log_text.count('ERROR')} ERROR records (stages raising SystemExit on purpose), "
              f"{log_text.count('Traceback')} tracebacks; server exit code after stop: {code}")


# ----------------------------------------------------------------------------- memory


def memory(args: argparse.Namespace) -> None:
    """RSS of a server (16 threads) around requests of 100,000 small instances."""
    with tempfile.TemporaryDirectory(prefix="mserve-soak-") as tmp:
        restful = {"threads": 16, "request_timeout": 100.0}
        if args.max_instances:
            restful["max_instances_per_request"] = args.max_instances
        proc, port, _ = start_server(Path(tmp), restful)
        body = _instances(100_000)
        print(f"body {len(body) / 1e6:.1f} MB, 100,000 instances; server threads 16")
        print(f"idle: {rss_mb(proc.pid):.0f} MB", flush=True)

        def one() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            conn.request("POST", ADD, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status

        peak = 0.0
        for label, rounds, parallel in (("1 request", 1, 1), ("3 more in a row", 3, 1), ("4 at once", 1, 4),
                                        ("4 at once again", 1, 4)):
            for _ in range(rounds):
                done = []
                workers = [threading.Thread(target=lambda: done.append(one())) for _ in range(parallel)]
                for w in workers:
                    w.start()
                while any(w.is_alive() for w in workers):
                    peak = max(peak, rss_mb(proc.pid))
                    time.sleep(0.05)
            time.sleep(1.0)  # a deferred trim has run
            print(f"after {label}: status {sorted(set(done))}, RSS {rss_mb(proc.pid):.0f} MB (peak so far {peak:.0f})",
                  flush=True)
        proc.stdin.close()
        proc.wait(30)


def probe_floods(args: argparse.Namespace) -> None:
    """How long a new client waits while one kind of hostile connection is held."""
    with tempfile.TemporaryDirectory(prefix="mserve-soak-") as tmp:
        workdir = Path(tmp)
        proc, http_port, https_port = start_server(workdir, {"threads": 16})
        ctx = ssl.create_default_context(cafile=str(workdir / "ca.pem"))

        def idle(port: int) -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=10)

        def slow_head(port: int) -> socket.socket:
            s = idle(port)
            s.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            return s

        def half_hello(port: int) -> socket.socket:
            s = idle(port)
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            return s

        def half_request(port: int) -> socket.socket:
            s = ctx.wrap_socket(idle(port), server_hostname="127.0.0.1")
            s.sendall(b"POST " + ADD.encode() + b" HTTP/1.1\r\nContent-Le")
            return s

        kinds = [("idle TCP", idle, http_port, None, 1000), ("slow request heads", slow_head, http_port, None, 1000),
                 ("idle TCP", idle, https_port, ctx, 1000), ("half ClientHellos", half_hello, https_port, ctx, 1000),
                 ("TLS + half a request", half_request, https_port, ctx, 32)]
        print("new client = a fresh connection posting the add request; 5 in a row, the slowest shown")
        for name, opener, port, tls, count in kinds:
            held = []
            try:
                for _ in range(count):
                    held.append(opener(port))
            except OSError as exc:
                print(f"  opening {name}: {exc}")
            time.sleep(0.5)
            worst = 0.0
            for _ in range(5):
                started = time.perf_counter()
                conn = connection(port, tls)
                conn.timeout = 10
                try:
                    conn.request("POST", ADD, ADD_BODY, {"Content-Type": "application/json"})
                    status = conn.getresponse().status
                except Exception as exc:  # noqa: BLE001 - reported
                    status = f"{type(exc).__name__} after 10 s"
                conn.close()
                worst = max(worst, time.perf_counter() - started)
                if not isinstance(status, int):
                    break
            scheme = "https" if tls else "http"
            print(f"{scheme:5} {len(held):5d} {name:22}: slowest new client {worst * 1000:8.1f} ms (last status {status})",
                  flush=True)
            for s in held:
                s.close()
            time.sleep(1.0)
        proc.stdin.close()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds per report line")
    parser.add_argument("--good", type=int, default=4, help="good keep-alive clients per scheme")
    parser.add_argument("--bad", type=int, default=2, help="bad clients per scheme")
    parser.add_argument("--flood-every", type=float, default=40.0)
    parser.add_argument("--flood-size", type=int, default=300, help="connections of each hostile kind")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-enqueued", type=int, default=64)
    parser.add_argument("--memory", action="store_true", help="RSS around 100,000-instance requests instead")
    parser.add_argument("--max-instances", type=int, default=0, help="--memory: the server's instance cap")
    parser.add_argument("--floods", action="store_true", help="new-client latency under each kind of flood instead")
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--restful", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), json.loads(args.restful))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still ends its servers (finally below)
    try:
        if args.memory:
            memory(args)
        elif args.floods:
            probe_floods(args)
        else:
            soak(args)
    finally:
        for proc in CHILDREN:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
