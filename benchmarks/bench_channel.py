"""Round-trip cost of the front-end <-> device process channel (app/devices/channel.py).

    .venv/bin/python benchmarks/bench_channel.py [--seconds 2]

A second process echoes (adds 1 to) the tensors of each call; the first calls it in a
loop. Compared: mserve's channel (descriptors over a unix socket, tensors in a shared
memory buffer) and what MLServer's worker pool does (arrays pickled through
multiprocessing queues), for a 2x2 float32 pair (the add servable) and a
1x1024 float32 row (the MLP). Microseconds per round trip; both sides share the cores.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mserve.devices.channel import Channel  # noqa: E402
from mserve.devices.shm import Buffer  # noqa: E402


def _shm_server(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn, _ = listener.accept()
    channel = Channel(conn)
    size = channel.recv()
    buf = Buffer.attach(channel.take_fd(), size)
    while True:
        try:
            descs = channel.recv()
        except ConnectionError:
            return
        outs = [buf.read(d) + 1 for d in descs]
        out_descs, _ = buf.write(outs)
        channel.send(("ok", out_descs))


def bench_shm(arrays: list[np.ndarray], seconds: float) -> float:
    path = os.path.join(tempfile.mkdtemp(), "dev.sock")
    proc = mp.get_context("spawn").Process(target=_shm_server, args=(path,), daemon=True)
    proc.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            sock.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    channel = Channel(sock)
    buf = Buffer.create(1 << 20)
    channel.send(buf.size, fds=(buf.fd,))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        descs, _ = buf.write(arrays)
        channel.send(descs)
        _, out = channel.recv()
        [buf.read(d).copy() for d in out]
        n += 1
    elapsed = time.perf_counter() - start
    channel.close()
    proc.join(5)
    return elapsed / n * 1e6


def _queue_server(requests: mp.Queue, replies: mp.Queue) -> None:
    while True:
        arrays = requests.get()
        if arrays is None:
            return
        replies.put([a + 1 for a in arrays])


def bench_queue(arrays: list[np.ndarray], seconds: float) -> float:
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_queue_server, args=(requests, replies), daemon=True)
    proc.start()
    requests.put(arrays)
    replies.get()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        requests.put(arrays)
        replies.get()
        n += 1
    elapsed = time.perf_counter() - start
    requests.put(None)
    proc.join(5)
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    cases = {
        "add: two float32[2,2]": [np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)],
        "mlp: one float32[1,1024]": [np.ones((1, 1024), np.float32)],
        "image: one float32[1,224,224,3]": [np.ones((1, 224, 224, 3), np.float32)],
    }
    print(f"{'payload':<34} {'shm + unix socket':>18} {'pickled mp.Queue':>17}  (µs per round trip)")
    for name, arrays in cases.items():
        shm = bench_shm(arrays, args.seconds)
        queue = bench_queue(arrays, args.seconds)
        print(f"{name:<34} {shm:>18.1f} {queue:>17.1f}")


if __name__ == "__main__":
    main()
