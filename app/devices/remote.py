"""The front-end side: model stages whose models live in device processes.

`RemoteModelStage` stands in for a `ModelStage` in a front-end's `LoadedVersion`:
it checks each instance against the model's specs right here (a bad instance fails
alone, at once, in MindSpore's words), then sends the good rows to a device process.
`RemoteBatcher` stands in for the version's `Batcher`: the pipeline announces rows
(`expect`) and submits them as before, and the device process batches them with
rows from every other front-end. Both go through a `DeviceClient`: one connection
(channel + shared-memory buffer) per front-end thread, opened on first use, so a
call is one send and one receive, with no thread hand-off.

A device process that is down (dead, restarting, not yet loaded) makes calls fail at
once with 503 and ``Retry-After``: the connection breaks when the process dies, and
connecting to its socket is refused until the new one serves. A call past its
deadline answers ``Time out`` and drops its connection (the device may still write
into that buffer), so the thread's next call opens a fresh one.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Sequence

import numpy as np

from ..backends import TensorSpec
from ..errors import InstanceError
from ..register import Model
from ..serving.model_stage import ModelStage
from .channel import Channel, ChannelClosed
from .shm import INITIAL_BYTES, Buffer, nbytes_of, storable

log = logging.getLogger("mserve.devices.remote")

# How long past a call's own deadline to wait for the device's answer (which says
# "Time out" itself) before giving the connection up.
_GRACE_SECONDS = 1.0


class DeviceUnavailable(Exception):
    """The device process cannot take calls right now."""


class _Connection:
    __slots__ = ("sock", "channel", "buffer", "wanted")

    def __init__(self, path: str, hello: tuple):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.channel = Channel(sock)
        self.buffer: Buffer | None = None
        self.wanted = 0  # outputs that came inline because the buffer was too small
        self.channel.send(hello)

    def ensure(self, size: int) -> Buffer:
        buffer = self.buffer
        if buffer is None or buffer.size < size:
            new_size = max(INITIAL_BYTES, size, 2 * buffer.size if buffer is not None else 0)
            new = Buffer.create(new_size)
            self.channel.send(("buffer", new_size), fds=(new.fd,))
            if buffer is not None:
                buffer.close()
            self.buffer = buffer = new
        return buffer

    def close(self) -> None:
        self.channel.close()
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None


class DeviceClient:
    """Calls into one device process (``key``: its device group, ``path``: its socket)."""

    def __init__(self, key: str, path: str, frontend: Any = None):
        self.key = key
        self.path = path
        self.hello = ("hello", frontend if frontend is not None else os.getpid())
        self._local = threading.local()
        self.down_since: float | None = None

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = _Connection(self.path, self.hello)
            except OSError as exc:
                self._mark_down()
                raise DeviceUnavailable(f"device process {self.key} is not serving ({exc.strerror or exc})") from None
            self._local.conn = conn
            self.down_since = None
        return conn

    def _mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def announce(self, kind: str, name: str, version: int, index: int, count: int) -> None:
        """One-way ``expect``/``arrive`` to the device's batcher; lost if the device is down."""
        try:
            self._connection().channel.send((kind, name, version, index, count))
        except DeviceUnavailable:
            pass
        except OSError:
            self._drop()
            self._mark_down()

    def run(
        self, name: str, version: int, index: int, rows: Sequence[tuple], deadline: float,
        announced: int, batched: bool, subgraph: int = 0,
    ) -> list[tuple | InstanceError]:
        """Rows (checked) through the model (its graph ``subgraph`` of several) in the
        device process: a result tuple or an `InstanceError` per row."""
        conn = self._connection()
        flat = [a for row in rows for a in row]
        inline = not all(storable(a) for a in flat)
        try:
            if inline:
                sent: list[tuple] = [tuple(row) for row in rows]
                buffer = conn.buffer
            else:
                buffer = conn.ensure(max(nbytes_of(flat), conn.wanted))
                descs, _ = buffer.write(flat)
                width = len(rows[0]) if rows else 0
                sent = [tuple(descs[i : i + width]) for i in range(0, len(descs), width)]
            remaining = deadline - time.monotonic()
            conn.sock.settimeout(max(remaining, 0) + _GRACE_SECONDS if remaining != float("inf") else None)
            conn.channel.send(("run", name, version, index, sent, remaining, announced, batched, subgraph))
            reply = conn.channel.recv()
        except socket.timeout:
            self._drop()
            return [InstanceError("Time out", status=504)] * len(rows)
        except (ChannelClosed, OSError) as exc:
            self._drop()
            self._mark_down()
            raise DeviceUnavailable(f"device process {self.key} went away ({exc})") from None
        results = reply[1]
        came_inline = [v for r in results if r[0] == "a" for v in r[1]]
        if came_inline and all(storable(v) for v in came_inline):
            conn.wanted = max(conn.wanted, nbytes_of(came_inline))  # room for such outputs next time
        return [_decode(result, buffer) for result in results]


def _decode(result: tuple, buffer: Buffer | None) -> tuple | InstanceError:
    kind = result[0]
    if kind == "e":
        return InstanceError(result[1], status=result[2])
    values = [buffer.read(d).copy() for d in result[1]] if kind == "d" else result[1]  # type: ignore[union-attr]
    return tuple(v[()] if scalar else v for v, scalar in zip(values, result[2]))


def _unavailable(exc: DeviceUnavailable) -> InstanceError:
    return InstanceError(f"Serving Error: {exc}; retry shortly", status=503)


class _SpecsOnly:
    """What a `ModelStage` reads from a runtime, for a model that runs elsewhere."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec], compile_count: int):
        self.inputs = inputs
        self.outputs = outputs
        self.compile_count = compile_count

    def predict(self, arrays: Any) -> Any:
        raise RuntimeError("this model runs in a device process")


def _specs(raw: list) -> list[TensorSpec]:
    return [TensorSpec(np.dtype(dtype), None if shape is None else tuple(shape)) for dtype, shape in raw]


class _Picker:
    """Which device process a front-end thread calls: threads stay with one (so a
    request's announcement and its rows reach the same batcher), spread round-robin;
    a thread whose device is down tries the others."""

    def __init__(self, clients: list[DeviceClient]):
        self.clients = clients
        self._next = itertools.count()
        self._local = threading.local()

    def order(self) -> list[DeviceClient]:
        if len(self.clients) == 1:
            return self.clients
        start = getattr(self._local, "start", None)
        if start is None:
            start = self._local.start = next(self._next) % len(self.clients)
        return self.clients[start:] + self.clients[:start]


class RemoteModelStage(ModelStage):
    """A model stage of a front-end: checks here, runs in a device process.
    ``subgraph`` > 0: the stage of that graph of a model of several files (its
    ``spec`` gives that graph's inputs and outputs), for ``Model.call(subgraph=i)``."""

    remote = True

    def __init__(
        self, model: Model, spec: dict[str, Any], clients: list[DeviceClient], servable: str, version: int,
        subgraph: int = 0,
    ):
        runtime = _SpecsOnly(_specs(spec["inputs"]), _specs(spec["outputs"]), spec["compile_count"])
        super().__init__(model, [runtime], spec["max_batch_size"], spec["buckets"] or None)
        self.placement = list(spec["placement"])
        self.instances = list(spec.get("instances", []))
        self.servable = servable
        self.version = version
        self.subgraph = subgraph
        self.picker = _Picker(clients)

    def warm_up(self) -> None:
        pass  # done in the device process

    def call(self, rows: Sequence[tuple], deadline: float, announced: int, batched: bool) -> list[Any]:
        """Check rows, send the good ones; a result or `InstanceError` per row."""
        results: list[Any] = [None] * len(rows)
        good: list[int] = []
        checked = []
        for i, row in enumerate(rows):
            try:
                checked.append(self.check(row))
                good.append(i)
            except InstanceError as exc:
                results[i] = exc
        clients = self.picker.order()
        if not good:
            if announced:
                clients[0].announce("arrive", self.servable, self.version, self.model.index, announced)
            return results
        last: DeviceUnavailable | None = None
        for client in clients:
            try:
                out = client.run(self.servable, self.version, self.model.index, checked, deadline, announced,
                                 batched, self.subgraph)
                break
            except DeviceUnavailable as exc:
                last = exc
        else:
            out = [_unavailable(last)] * len(good)  # type: ignore[arg-type]
        for i, result in zip(good, out):
            results[i] = result
        return results

    def run(self, rows: Sequence[Sequence[Any]]) -> list[tuple | InstanceError]:
        return self.call([tuple(r) for r in rows], float("inf"), 0, batched=False)


class RemoteBatcher:
    """A front-end's view of a device process's `Batcher` for one model stage."""

    def __init__(self, stage: RemoteModelStage, max_delay: float):
        self.stage = stage
        self.max_delay = max_delay
        self.max_batch_size = stage.max_batch_size or 1

    def expect(self, count: int) -> None:
        self.stage.picker.order()[0].announce("expect", self.stage.servable, self.stage.version,
                                              self.stage.model.index, count)

    def arrive(self, count: int) -> None:
        self.stage.picker.order()[0].announce("arrive", self.stage.servable, self.stage.version,
                                              self.stage.model.index, count)

    def run(self, rows: Sequence[tuple], deadline: float, announced: int = 0) -> list[Any]:
        return self.stage.call(rows, deadline, announced, batched=True)

    def stop(self) -> None:
        pass
