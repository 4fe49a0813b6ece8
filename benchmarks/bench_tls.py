"""HTTPS against HTTP on the bundled add servable, one process, same run.

Starts the add servable once, serves it over plain HTTP (Waitress) and HTTPS
(Waitress with TLS in its event loop, `mserve.transport.https`, one-way, trustme certificates) in this process, and drives
each with keep-alive connections from a separate load-generator process: Debian's
``wrk`` when it is installed (``apt-get install -y wrk``), otherwise a Python
http.client load generator (threads in a subprocess; slower, so it understates both
servers). Passes alternate HTTP and HTTPS; medians are reported. Also measured: the
same HTTPS server with mutual TLS (Python client: wrk has no client certificates)
and, with ``--handshakes``, new connections per request (``Connection: close``),
which is where TLS costs most.

Loopback only (127.0.0.1); every run is bounded in time.

    .venv/bin/python benchmarks/bench_tls.py                  # 4 and 16 connections, 3 x 5 s passes
    .venv/bin/python benchmarks/bench_tls.py -c 16 -d 10 --passes 4 --handshakes
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BODY = b'{"instances":[{"x1":[[1.0,2.0],[3.0,4.0]],"x2":[[1.0,2.0],[3.0,4.0]]}]}'
PATH = "/model/add:add_common"
EXPECT = {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}


# ------------------------------------------------------------------ load generators


def python_client(url: str, connections: int, seconds: float, cafile: str | None, certfile: str | None,
                  close: bool) -> dict:
    """Keep-alive http.client threads (run in a subprocess, see ``--client-worker``)."""
    from urllib.parse import urlparse

    u = urlparse(url)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), "loopback only"
    ctx = None
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=cafile)
        if certfile:
            ctx.load_cert_chain(certfile)

    def connect() -> http.client.HTTPConnection:
        if ctx is not None:
            return http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=10)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=10)

    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + seconds
    headers = {"Content-Type": "application/json"}
    if close:
        headers["Connection"] = "close"

    def worker() -> None:
        mine: list[float] = []
        conn = connect()
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                conn.request("POST", u.path, BODY, headers)
                r = conn.getresponse()
                data = r.read()
                if r.status != 200 or json.loads(data) != EXPECT:
                    raise ValueError(f"bad reply {r.status} {data[:100]!r}")
                if close:
                    conn.close()
                    conn = connect()
            except Exception:  # noqa: BLE001 - counted
                conn.close()
                conn = connect()
                with lock:
                    errors[0] += 1
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3 if latencies else float("nan")

    return {"rps": len(latencies) / wall, "p50": pct(50), "p99": pct(99), "errors": errors[0]}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk_client(url: str, connections: int, seconds: float, close: bool) -> dict:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        + ('wrk.headers["Connection"] = "close"\n' if close else "")
    )
    seconds = max(1, round(seconds))  # wrk takes whole seconds
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if socket_errors and not close:
        errors += sum(map(int, socket_errors.groups()))
    return {"rps": rps, "p50": p50, "p99": p99, "errors": errors}


def drive(client: str, url: str, connections: int, seconds: float, cafile: str | None = None,
          certfile: str | None = None, close: bool = False) -> dict:
    if client == "wrk" and not certfile:
        return wrk_client(url, connections, seconds, close)
    cmd = [sys.executable, __file__, "--client-worker", json.dumps(
        {"url": url, "connections": connections, "seconds": seconds, "cafile": cafile, "certfile": certfile,
         "close": close})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--connections", type=int, nargs="+", default=[4, 16])
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=16, help="server worker threads (both servers)")
    ap.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    ap.add_argument("--no-mutual", action="store_true", help="skip the mutual-TLS row")
    ap.add_argument("--handshakes", action="store_true",
                    help="also measure Connection: close (a handshake per request)")
    ap.add_argument("--client-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.client_worker:
        spec = json.loads(args.client_worker)
        print(json.dumps(python_client(**spec)))
        return

    import logging

    import trustme
    import waitress  # noqa: F401 - version below

    from importlib.metadata import version

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mserve import server

    logging.getLogger("mserve.access").setLevel(logging.WARNING)
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" notices under load
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "python"

    tmp = Path(tempfile.mkdtemp(prefix="bench_tls_"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(tmp / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(tmp / "server.crt")
    cert.private_key_pem.write_to_path(tmp / "server.key")
    ca.issue_cert("bench-client@mserve.test").private_key_and_cert_chain_pem.write_to_path(tmp / "client.pem")
    cafile = str(tmp / "ca.pem")

    bundled = Path(__file__).resolve().parents[1] / "servables"
    server.start_servables(server.ServableStartConfig(bundled, "add"))
    try:
        http_srv = server.start_restful_server("127.0.0.1:0", threads=args.threads)
        https_srv = server.start_restful_server(  # listeners beside the first (MindSpore allows one)
            "127.0.0.1:0", threads=args.threads, additional=True,
            ssl_config=server.SSLConfig(str(tmp / "server.crt"), str(tmp / "server.key")),
        )
        mutual_srv = None
        if not args.no_mutual:
            mutual_srv = server.start_restful_server(
                "127.0.0.1:0", threads=args.threads, additional=True,
                ssl_config=server.SSLConfig(str(tmp / "server.crt"), str(tmp / "server.key"), cafile, True),
            )

        print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.processor() or platform.machine()}")
        print(f"python {platform.python_version()}, {ssl.OPENSSL_VERSION}, waitress {version('waitress')}; "
              f"server threads {args.threads}; load generator: {client} "
              f"(separate process, same machine); {args.passes} x {args.duration:g} s passes, medians")
        print("(the load generator shares the CPUs with the server: compare the rows, not absolutes)\n")

        rows = []
        plans = [("keep-alive", False)] + ([("Connection: close", True)] if args.handshakes else [])
        for label, close in plans:
            for conns in args.connections:
                runs: dict[str, list[dict]] = {"HTTP": [], "HTTPS": []}
                for _ in range(args.passes):  # alternate, so drift hits both alike
                    runs["HTTP"].append(drive(client, http_srv.url + PATH, conns, args.duration, close=close))
                    runs["HTTPS"].append(
                        drive(client, https_srv.url + PATH, conns, args.duration, cafile=cafile, close=close))
                med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50", "p99")}
                       for k, v in runs.items()}
                errs = {k: sum(r["errors"] for r in v) for k, v in runs.items()}
                rows.append((label, conns, med, errs))
                print(f"{label}, {conns} connections:")
                for k in ("HTTP", "HTTPS"):
                    print(f"  {k:<6} {med[k]['rps']:>8,.0f} req/s  p50 {med[k]['p50']:6.2f} ms  "
                          f"p99 {med[k]['p99']:6.2f} ms  errors {errs[k]}")
                print(f"  HTTPS/HTTP throughput ratio: {med['HTTPS']['rps'] / med['HTTP']['rps']:.2f}\n")

        if mutual_srv is not None:
            conns = args.connections[-1]
            one = drive("python", https_srv.url + PATH, conns, args.duration, cafile=cafile)
            mut = drive("python", mutual_srv.url + PATH, conns, args.duration, cafile=cafile,
                        certfile=str(tmp / "client.pem"))
            print(f"mutual vs one-way TLS, {conns} keep-alive connections, Python client (1 pass):")
            for k, r in (("one-way", one), ("mutual", mut)):
                print(f"  {k:<8} {r['rps']:>8,.0f} req/s  p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  "
                      f"errors {r['errors']}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
