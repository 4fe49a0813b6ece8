"""GPU check: mserve's device processes on a real GPU, compared with the CPU.

    pip install -e '.[cuda]'            # jax with CUDA 12 on the GPU machine
    python benchmarks/gpu_check.py [--workers 4] [--seconds 5] [--device-ids 0]

What it does, each step printing PASS/FAIL (exit code 1 on any FAIL):

1. Starts ``mserve start --device-type gpu --workers N`` and ``mserve start
   --device-type cpu --workers 1`` on free ports, serving the bundled add and
   LeNet and a weight-heavy MLP (1024-2048-2048-10, written to a temp folder,
   batching on).
2. Sends the same requests to both and compares: add exactly, LeNet's digits
   equal and probabilities within 1e-4, the MLP's outputs within float32 matmul
   tolerance (rtol/atol 2e-2: XLA may use TF32 for float32 matmuls on Ampere and
   newer GPUs; the largest difference is printed).
3. One model copy per GPU: the process tree has N front-ends and one device
   process per GPU id; ``/model/{name}`` places every model on ``gpu:ID`` in that
   process (no front-end copy on accelerators); ``nvidia-smi`` (when present)
   lists only device processes as GPU users, each using memory once.
4. Throughput: LeNet and the MLP at 32 keep-alive connections (a Python load
   generator, so no wrk is needed), on the GPU and on the CPU.

Never run on the machine this was written on (no GPU there); see the issue note.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_serving import MLP_SIZES, SERVABLES, lenet_body, write_mlp_servable  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Started:
    """``mserve start DIR ...`` as a subprocess on a free port."""

    def __init__(self, root: Path, args: list[str], log: Path):
        self.port = free_port()
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mserve.cli", "start", str(root), "--port", str(self.port), "--no-access-log", *args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600  # first GPU compiles can be slow
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"mserve start {' '.join(args)} exited {self.proc.returncode}; see {log}")
            try:
                if self.get("/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"mserve start {' '.join(args)} not ready in 600 s; see {log}")

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"{}")
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body: dict | str) -> dict:
        status, data = self.request("POST", path, body if isinstance(body, str) else json.dumps(body))
        if status != 200:
            raise RuntimeError(f"POST {path}: {status} {data}")
        return data

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def children(pid: int) -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {"frontend": [], "device": []}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            line = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        if "mserve.runtime.device_role" in line:
            roles["device"].append(int(entry))
        elif "mserve.runtime.frontend_role" in line:
            roles["frontend"].append(int(entry))
    return roles


def gpu_users() -> dict[int, int] | None:
    """pid -> MiB of GPU memory, from nvidia-smi (None when it is not there)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    users = {}
    for line in out.splitlines():
        if line.strip():
            pid, mib = (p.strip() for p in line.split(","))
            users[int(pid)] = int(mib)
    return users


def load(server: Started, path: str, body: str, connections: int, seconds: float) -> float:
    """Requests/s with ``connections`` keep-alive connections for ``seconds``."""
    counts = [0] * connections
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while time.monotonic() < stop:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                errors.append(str(reply.status))
            counts[i] += 1
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        check(False, f"{path}: {len(errors)} non-200 replies under load ({errors[0]})")
    return sum(counts) / (time.monotonic() - started)


def mlp_request(rows: np.ndarray) -> dict:
    return {"instances": [
        {"x": {"b64": base64.b64encode(r.astype(np.float32).tobytes()).decode(), "type": "float32",
               "shape": [MLP_SIZES[0]]}} for r in rows
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="front-end processes of the GPU server")
    parser.add_argument("--device-ids", default="0", help="GPU ids, e.g. 0,1 (one device process each)")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    gpu_ids = [int(i) for i in args.device_ids.split(",")]

    probe = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices('gpu')))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"no GPU visible to JAX here ({probe.stderr.strip().splitlines()[-1:]}); "
                         "install jax with CUDA: pip install -e '.[cuda]'")
    print(f"JAX sees {probe.stdout.strip()} GPU(s)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "servables"
        root.mkdir()
        for name in ("add", "lenet"):
            os.symlink(SERVABLES / name, root / name)
        write_mlp_servable(root)
        gpu = Started(root, ["--device-type", "gpu", "--device-ids", args.device_ids, "--workers", str(args.workers)],
                      Path(tmp) / "gpu.log")
        try:
            cpu = Started(root, ["--device-type", "cpu", "--workers", "1"], Path(tmp) / "cpu.log")
        except BaseException:
            gpu.stop()
            raise
        try:
            # ---------------------------------------------------------- results
            add = {"instances": [{"x1": [[1.5, -2.0], [3.25, 4.0]], "x2": [[0.5, 2.0], [-3.0, 1e-3]]}]}
            check(gpu.post("/model/add:add_common", add) == cpu.post("/model/add:add_common", add),
                  "add: GPU result equals the CPU result")
            lenet = lenet_body(8)
            g, c = gpu.post("/model/lenet:predict", lenet)["instances"], cpu.post("/model/lenet:predict", lenet)["instances"]
            check([i["result"] for i in g] == [i["result"] for i in c], "LeNet: same digits on GPU and CPU")
            check(np.allclose([i["probability"] for i in g], [i["probability"] for i in c], rtol=1e-4, atol=1e-4),
                  "LeNet: probabilities within 1e-4")
            rows = np.random.default_rng(7).standard_normal((16, MLP_SIZES[0])).astype(np.float32)
            g = np.array([i["y"] for i in gpu.post("/model/mlp:predict", mlp_request(rows))["instances"]], np.float32)
            c = np.array([i["y"] for i in cpu.post("/model/mlp:predict", mlp_request(rows))["instances"]], np.float32)
            diff = float(np.max(np.abs(g - c)))
            check(np.allclose(g, c, rtol=2e-2, atol=2e-2), f"MLP: GPU within float32 matmul tolerance (max |diff| {diff:.3g})")

            # ---------------------------------------------------------- one copy per GPU
            roles = children(gpu.proc.pid)
            check(len(roles["frontend"]) == args.workers, f"{args.workers} front-end processes ({roles['frontend']})")
            check(len(roles["device"]) == len(gpu_ids), f"one device process per GPU ({roles['device']})")
            for name in ("add", "lenet", "mlp"):
                _, described = gpu.get(f"/model/{name}")
                placement = [p for m in described["versions"][0]["models"] for p in m["placement"]]
                check(sorted(p["device"] for p in placement) == sorted(f"gpu:{i}" for i in gpu_ids)
                      and all(p["role"] == "device process" and p["pid"] in roles["device"] for p in placement),
                      f"{name}: held once per GPU, by a device process ({placement})")
            users = gpu_users()
            if users is None:
                print("SKIP  nvidia-smi not found: GPU memory per process not checked")
            else:
                ours = {pid: mib for pid, mib in users.items() if pid in roles["frontend"] + roles["device"]}
                check(not any(pid in roles["frontend"] for pid in users), "no front-end process uses the GPU")
                check(sorted(ours) == sorted(roles["device"]), f"GPU memory per device process (MiB): {ours}")

            # ---------------------------------------------------------- throughput
            mlp_one = json.dumps(mlp_request(rows[:1]))
            print(f"\n{'throughput, 32 connections, ' + str(args.seconds) + ' s':<44} {'GPU req/s':>10} {'CPU req/s':>10}")
            for label, path, body in (("LeNet (PNG stage, batching on)", "/model/lenet:predict", lenet_body()),
                                      ("MLP 1024-2048-2048-10 (batching on)", "/model/mlp:predict", mlp_one),
                                      ("add", "/model/add:add_common", json.dumps(add))):
                print(f"{label:<44} {load(gpu, path, body, 32, args.seconds):>10.0f} "
                      f"{load(cpu, path, body, 32, args.seconds):>10.0f}", flush=True)
        finally:
            gpu.stop()
            cpu.stop()
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed")
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
