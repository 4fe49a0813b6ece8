"""The cost of one request, mserve against MindSpore Serving, in one alternating run.

    .venv/bin/python benchmarks/bench_serving.py --only cost [--mindspore] [--rounds 3] [--seconds 5]
        [--concurrency 4,16] [--protocols REST,gRPC,HTTPS] [--against REF] [--variant NAME=FLAGS]

Starts, side by side and for the whole run:

* ``mserve start --servable add --grpc-port G`` (the default configuration: access
  log on, written to /dev/null here; default front-ends; a device process);
* the same with ``--ssl-certfile/--ssl-keyfile`` (HTTPS and TLS gRPC);
* MindSpore Serving 2.0.2's add (the anchor in ../shared/anchors/mindspore_serving,
  REST and gRPC on free ports, from a private copy of its run folder so that other
  users of the anchor are not disturbed);

then runs rounds. In each round every scenario (REST c4 and c16 with ``wrk -t1``
keep-alive, gRPC c4 and c16 with `bench_grpc.drive`, HTTPS c4 and c16 with wrk) is
measured on every server that speaks it, the servers' order flipping every round, so
that drift on a shared machine hits them alike. Per measurement: req/s, p50/p99, and
the server's CPU per request (its whole process tree's utime+stime from /proc,
before and after, over the requests served: `proc_cpu`). Reported: the medians over
the rounds, and the same-run ratios of mserve to each other server (MindSpore, an
``--against`` commit, a ``--variant``) and of HTTPS to HTTP.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_grpc import ANCHOR, WARMUP, drive, free_port
from proc_cpu import tree_cpu

REPO = Path(__file__).resolve().parents[1]
ADD_PATH = "/model/add:add_common"
WARMUP_SECONDS = 1.0


def _ready(url: str, context: ssl.SSLContext | None) -> bool:
    """Whether mserve's ``/ready`` says every servable is loaded."""
    try:
        with urllib.request.urlopen(url + "/ready", timeout=5, context=context) as reply:
            return b'"ready":true' in reply.read().replace(b" ", b"")
    except OSError:
        return False


def checkout(ref: str, folder: Path) -> Path:
    """The ``mserve`` package as of git ``ref``, laid out under ``folder`` as the editable
    install maps it (app -> mserve, backends -> mserve.backends, ...); put ``folder``
    first on PYTHONPATH to run that version."""
    package = folder / "mserve"
    package.parent.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "app", "backends", "cli", "servables"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "app").rename(package)
    for part in ("backends", "cli", "servables"):
        (folder / part).rename(package / part)
    return folder


class MserveStarted:
    """``mserve start --servable add`` with a gRPC port (and TLS when ``tls`` is given);
    ``code``: a `checkout` to run instead of the installed mserve."""

    def __init__(self, name: str, tls: tuple[str, str] | None = None, extra: tuple[str, ...] = (),
                 code: Path | None = None):
        self.name = name
        self.port, self.grpc_port = free_port(), free_port()
        scheme = "https" if tls else "http"
        self.rest = f"{scheme}://127.0.0.1:{self.port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.tls = tls is not None
        env = {**os.environ, "NO_COLOR": "1"}
        if code is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "mserve.cli"]
        tls_flags = ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]] if tls else []
        self.proc = subprocess.Popen(
            [*command, "start", "--servable", "add", "--port", str(self.port), "--grpc-port", str(self.grpc_port),
             *tls_flags, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        self.pid = self.proc.pid
        context = ssl._create_unverified_context() if tls else None
        deadline = time.monotonic() + 180
        while not _ready(self.rest, context):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name}: `mserve start` was not ready within 180 s")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MindSporeStarted:
    """MindSpore Serving 2.0.2's add example (the anchor), REST and gRPC on free ports,
    run from a private folder: links to the anchor's installation (``$MSS_ROOT``, by
    default /tmp/msserving) and a copy of its servable folder, where Serving writes its
    sockets, logs and PID file."""

    name = "MindSpore Serving 2.0.2"
    tls = False

    def __init__(self):
        shared = Path(os.environ.get("MSS_ROOT", Path(tempfile.gettempdir()) / "msserving"))
        if not (shared / "venv").is_dir():
            raise RuntimeError(f"MindSpore Serving is not set up in {shared}: run the anchor's setup.sh")
        self.root = Path(tempfile.mkdtemp(prefix="mss-bench-"))
        for entry in shared.iterdir():
            if entry.name == "tensor_add":
                shutil.copytree(entry, self.root / entry.name)
            elif entry.is_dir():
                (self.root / entry.name).symlink_to(entry)
        self.port, self.grpc_port = free_port(), free_port()
        self.rest = f"http://127.0.0.1:{self.port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"
        self.env = dict(os.environ, MSS_ROOT=str(self.root), MSS_RESTFUL_ADDR=f"127.0.0.1:{self.port}",
                        MSS_GRPC_ADDR=self.grpc)
        started = subprocess.run(["bash", str(ANCHOR / "start_add.sh")], env=self.env, capture_output=True,
                                 text=True)
        if started.returncode:
            shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(f"MindSpore Serving did not start: {started.stderr[-2000:]}")
        self.pid = int((self.root / "server.pid").read_text())

    def stop(self) -> None:
        subprocess.run(["bash", str(ANCHOR / "stop_add.sh")], env=self.env, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _measured(server, run) -> dict:
    """``run()`` (a load run returning rps and the seconds it drove) with the server's CPU."""
    before = tree_cpu(server.pid)
    result = run()
    used = tree_cpu(server.pid) - before
    served = result.pop("requests")
    result["cpu_us"] = used / served * 1e6 if served else float("nan")
    return result


def rest_run(server, connections: int, seconds: float, body: str) -> dict:
    from bench_serving import wrk

    result = wrk(server.rest + ADD_PATH, body, connections, seconds)
    result["requests"] = result["rps"] * seconds
    return result


def grpc_run(server, connections: int, seconds: float) -> dict:
    result = drive(server.grpc, connections, seconds, clients=2)
    result["requests"] = result["rps"] * (seconds + WARMUP)  # warm-up calls cost server CPU too
    return result


def _certificates(folder: Path) -> tuple[str, str]:
    import trustme

    cert = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(folder / "server.crt")
    cert.private_key_pem.write_to_path(folder / "server.key")
    return str(folder / "server.crt"), str(folder / "server.key")


PROTOCOLS = ("REST", "gRPC", "HTTPS")


def scenarios(concurrency: list[int], protocols: tuple[str, ...] = PROTOCOLS) -> list[tuple[str, str, int]]:
    """(label, protocol, connections) of one round."""
    rows = []
    for protocol in protocols:
        rows += [(f"{protocol} c{c}", protocol, c) for c in concurrency]
    return rows


def compare(rounds: int, seconds: float, concurrency: list[int], mindspore: bool, body: str,
            mserve_flags: tuple[str, ...] = (), protocols: tuple[str, ...] = PROTOCOLS,
            against: str | None = None, variants: dict[str, tuple[str, ...]] | None = None,
            warm_up: bool = True) -> list[str]:
    """Run the rounds; returns the report's lines. ``against``: a git ref whose mserve
    runs beside this one (same flags, plain HTTP and gRPC), to measure a change;
    ``variants``: more mserve servers (plain HTTP and gRPC), name -> their extra flags,
    to measure a setting; ``warm_up``: a short unrecorded round first."""
    servers: list = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    try:
        if mindspore:
            servers.append(MindSporeStarted())
        servers.append(MserveStarted("mserve", extra=mserve_flags))
        for name, flags in (variants or {}).items():
            servers.append(MserveStarted(f"mserve {name}", extra=(*mserve_flags, *flags)))
        if against:
            servers.append(MserveStarted(f"mserve {against}", extra=mserve_flags,
                                         code=checkout(against, tmp / "against")))
        if "HTTPS" in protocols:
            servers.append(MserveStarted("mserve HTTPS", tls=_certificates(tmp), extra=mserve_flags))
        plan = scenarios(concurrency, protocols)
        results: dict[tuple[str, str], list[dict]] = {}
        for number in range(-1 if warm_up else 0, rounds):  # round -1: a short warm-up of every path, not recorded
            for label, protocol, c in plan:
                speaking = [s for s in servers if s.tls == (protocol == "HTTPS")]
                if number % 2:
                    speaking.reverse()
                for server in speaking:
                    length = seconds if number >= 0 else 1

                    def run(server=server, protocol=protocol, c=c, length=length) -> dict:
                        if protocol == "gRPC":
                            return grpc_run(server, c, length)
                        return rest_run(server, c, length, body)
                    result = _measured(server, run)
                    if number >= 0:
                        results.setdefault((label, server.name), []).append(result)
        return report(results, plan, rounds, seconds)
    finally:
        stoppers = [threading.Thread(target=s.stop) for s in servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        shutil.rmtree(tmp, ignore_errors=True)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[tuple[str, str], list[dict]], plan: list, rounds: int, seconds: float) -> list[str]:
    lines = [f"server CPU per request: the server's whole process tree (utime+stime from /proc) over requests "
             f"served; medians of {rounds} alternating round(s), {seconds:g} s per measurement",
             f"{'scenario':<10} {'server':<24} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>10} "
             f"{'err':>4}"]
    for label, _, _ in plan:
        for (row, name), runs in results.items():
            if row == label:
                lines.append(f"{label:<10} {name:<24} {_median(runs, 'rps'):>8.0f} {_median(runs, 'p50'):>7.2f} "
                             f"{_median(runs, 'p99'):>7.2f} {_median(runs, 'cpu_us'):>10.0f} "
                             f"{sum(r['errors'] for r in runs):>4}")
    ratios = []
    others = sorted({name for _, name in results if name not in ("mserve", "mserve HTTPS")})
    for label, protocol, _ in plan:
        mine = results.get((label, "mserve HTTPS" if protocol == "HTTPS" else "mserve"))
        for other in others:
            theirs = results.get((label, other))
            if mine and theirs:
                ratios.append(f"{label}: mserve / {other}: req/s {_median(mine, 'rps') / _median(theirs, 'rps'):.2f}x, "
                              f"CPU per request {_median(mine, 'cpu_us') / _median(theirs, 'cpu_us'):.2f}x")
        if protocol == "HTTPS" and mine and results.get((label.replace("HTTPS", "REST"), "mserve")):
            plain = results[(label.replace("HTTPS", "REST"), "mserve")]
            ratios.append(f"{label}: mserve HTTPS / HTTP req/s {_median(mine, 'rps') / _median(plain, 'rps'):.2f}x, "
                          f"CPU per request {_median(mine, 'cpu_us') / _median(plain, 'cpu_us'):.2f}x")
    return lines + ratios
