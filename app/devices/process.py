"""The device process's server: the only process that holds the models of its
device (group).

The process (`mserve.runtime.device_role`, run by `supervisor.DeviceSupervisor`
with its settings as JSON on stdin) loads its servables through the ordinary
in-process path (``Runtime.start_servables``: definitions, version folders,
warm-up of every batch bucket, one `Batcher` per model stage, hot reload when asked),
then listens on a unix socket. Every front-end thread that calls a model has its own
connection here (`channel.Channel` + a shared-memory `shm.Buffer`), served by its own
thread: rows from all front-ends meet in the same `Batcher`, so one device call
carries requests that arrived on different front-ends.

While loading it prints ``PROGRESS <json>`` per step (`mserve.serving.progress`);
it prints ``READY <json>`` (what it serves, `describe`) on stdout once it listens,
``SERVES <json>`` whenever hot reload changed that, or ``FAILED <message>`` and exits 1
when loading fails. SIGTERM: stop listening, let calls in flight finish, unload, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..ops.metadata import model_instances
from .channel import Channel, ChannelClosed
from .shm import Buffer, nbytes_of, storable

log = logging.getLogger("mserve.devices.process")


def die_with_parent() -> None:
    """Exit when the process that started this one is gone, so a supervisor killed
    outright never leaves device or front-end processes behind. (Not
    ``PR_SET_PDEATHSIG``: it fires when the parent *thread* ends, and a restarted
    process is started by a watcher thread that ends at stop, before the drain.)"""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="mserve-parent-watch", daemon=True).start()


def local_device_ids(device_type: str | None, ids: list[int], remapped: bool) -> list[int]:
    """The ids to ask JAX for here: with ``CUDA_VISIBLE_DEVICES`` narrowed to this
    group's GPUs (``remapped``), they are 0..n-1. On the CPU too: each device process
    has the host's CPU to itself, so, as in MindSpore Serving, CPU device ids are
    labels (``device_ids=(0, 1)`` is two CPU device processes)."""
    kind = (device_type or "").lower()
    if kind == "cpu":
        return list(range(len(ids)))
    if not remapped:
        return ids
    if kind in ("gpu", "cuda"):
        return list(range(len(ids)))
    if kind == "":
        import jax

        if jax.default_backend() in ("gpu", "cpu"):
            return list(range(len(ids)))
    return ids


def describe(
    runtime: Any, group: str, socket_path: str, hidden: set[tuple[str, int]] = set()
) -> dict[str, Any]:
    """What ``runtime`` (this process's) serves, for the manifest the front-ends
    build their stand-in model stages from: per version and model, the specs and
    batching (``hidden``: versions being retired, which front-ends should stop calling)."""
    from ..ops.metrics import device_name

    servables = []
    devices: set[str] = set()
    for servable in runtime.registry.servables().values():
        config = runtime.configured.get(servable.name)
        versions = {}
        for number, loaded in servable.versions.items():
            if (servable.name, number) in hidden:
                continue
            models = {}
            for index, stage in loaded.stages.items():
                batcher = loaded.batchers.get(index)
                names = [device_name(r) for r in stage.runtimes]
                devices.update(names)
                models[str(index)] = {
                    "frontend_copy": _frontend_copy(
                        stage, batcher is not None, names, config,
                        Path(servable.directory) / servable.name / str(number),
                    ),
                    "inputs": [[s.dtype.str, None if s.shape is None else list(s.shape)] for s in stage.inputs],
                    "outputs": [[s.dtype.str, None if s.shape is None else list(s.shape)] for s in stage.outputs],
                    "max_batch_size": stage.max_batch_size,
                    "buckets": list(stage.buckets),
                    "cross_request": batcher is not None,
                    "max_delay": batcher.max_delay if batcher is not None else None,
                    "compile_count": stage.compile_count,
                    "devices": names,
                    "instances": model_instances(stage),
                    "backend": list(loaded.backends.get(index, ("?", "?"))),
                    "files": [os.fspath(Path(servable.directory) / servable.name / str(number) / f)
                              for f in stage.model.model_files],
                    # graphs 1.. of a model of several files (Model.call(subgraph=i)), in order
                    "subgraphs": [_subgraph_spec(loaded.subgraph_stages[(index, i)])
                                  for i in range(1, loaded.subgraph_count(stage.model))],
                }
            versions[str(number)] = {"models": models}
        servables.append({
            "name": servable.name,
            "directory": os.fspath(servable.directory),
            "config": _config_json(config.config) if config is not None else None,
            "versions": versions,
        })
    return {"group": group, "socket": socket_path, "pid": os.getpid(), "devices": sorted(devices),
            "servables": servables}


def _subgraph_spec(stage: Any) -> dict[str, Any]:
    """What a front-end needs to check a subgraph's instances before sending them."""
    return {
        "inputs": [[s.dtype.str, None if s.shape is None else list(s.shape)] for s in stage.inputs],
        "outputs": [[s.dtype.str, None if s.shape is None else list(s.shape)] for s in stage.outputs],
        "max_batch_size": stage.max_batch_size,
        "buckets": list(stage.buckets),
        "compile_count": stage.compile_count,
    }


FRONTEND_COPY_FORMATS = ("jax_export", "jax_function")


def _frontend_copy(stage: Any, batched: bool, devices: list[str], config: Any, folder: Path) -> bool:
    """Whether front-ends should hold their own copy of this model: small, on the
    CPU, a JAX format, and not batched across requests (batching needs the rows of
    every front-end in one place). Never for a model on an accelerator."""
    limit = getattr(config.config, "frontend_copy_max_kb", 0) if config is not None else 0
    if not limit or batched or stage.model.model_format.lower() not in FRONTEND_COPY_FORMATS:
        return False
    if stage.model.options.get("sharding"):  # one instance over several devices
        return False
    if not devices or not all(d.startswith("cpu:") for d in devices):
        return False
    try:
        size = sum((folder / f).stat().st_size for f in stage.model.model_files)
    except OSError:
        return False
    return size <= limit * 1024


def _config_json(config: Any) -> dict[str, Any]:
    import dataclasses

    data = dataclasses.asdict(config)
    data["servable_directory"] = os.fspath(config.servable_directory)
    # The key stays in the device process: front-ends never load an encrypted model (only
    # JAX models get front-end copies), and this description is written to the manifest.
    data["dec_key"] = None
    return data


class DeviceServer:
    """Accepts front-end connections on a unix socket and runs their model calls
    on the versions ``runtime`` (this process's `mserve.runtime.runtime.Runtime`) serves."""

    def __init__(self, runtime: Any, socket_path: str, group: str = ""):
        self.runtime = runtime
        self.socket_path = socket_path
        self.group = group
        self.hidden: set[tuple[str, int]] = set()  # versions being retired
        self._last_call: dict[tuple[str, int], float] = {}
        self._report_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._active = 0
        self._cv = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._stopping = False

    def listen(self) -> None:
        try:
            os.unlink(self.socket_path)  # left by a predecessor that died
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        listener.listen(256)
        self._listener = listener
        threading.Thread(target=self._accept, name="mserve-device-accept", daemon=True).start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cv:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="mserve-device-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        channel = Channel(conn)
        buffer: Buffer | None = None
        source: Any = None
        try:
            while True:
                message = channel.recv()
                kind = message[0]
                if kind == "run":
                    with self._cv:
                        self._active += 1
                    try:
                        channel.send(self._run(message, buffer, source))
                    finally:
                        with self._cv:
                            self._active -= 1
                            self._cv.notify_all()
                elif kind == "expect" or kind == "arrive":
                    self._announce(message)
                elif kind == "buffer":
                    if buffer is not None:
                        buffer.close()
                    buffer = Buffer.attach(channel.take_fd(), message[1])
                elif kind == "hello":
                    source = message[1]
                else:
                    log.error("unknown message %r from a front-end; closing its connection", kind)
                    return
        except (ChannelClosed, OSError):
            pass  # the front-end thread went (or dropped a call that timed out)
        except Exception:
            log.exception("device connection failed")
        finally:
            with self._cv:
                self._connections.discard(conn)
            channel.close()
            if buffer is not None:
                buffer.close()

    def stop(self, drain_timeout: float) -> None:
        """Stop listening, let the calls in flight finish (up to ``drain_timeout``),
        then close every connection."""
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.close()
                os.unlink(self.socket_path)
            except OSError:
                pass
        with self._cv:
            if not self._cv.wait_for(lambda: self._active == 0, drain_timeout):
                log.warning("%d model call(s) still running after %gs; stopping anyway", self._active, drain_timeout)
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def say(self, line: str) -> None:
        """One line to the supervisor (stdout), never interleaved with a report."""
        with self._report_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def report(self) -> None:
        """Tell the supervisor what this process serves now (``SERVES <json>``)."""
        with self._report_lock:
            print("SERVES " + json.dumps(describe(self.runtime, self.group, self.socket_path, set(self.hidden))), flush=True)

    def retire(self, name: str, version: int, quiet: float = 2.0, limit: float = 120.0) -> None:
        """Hot reload's retirement of a version, with front-ends in other processes:
        first stop listing it (the front-ends switch to what they are told), keep
        answering it until it has had no call for ``quiet`` seconds, then unload it."""
        key = (name, version)
        self.hidden.add(key)
        self.report()
        started = time.monotonic()
        while time.monotonic() - started < limit:
            time.sleep(0.1)
            if time.monotonic() - max(self._last_call.get(key, 0.0), started) >= quiet:
                break
        self.runtime.retire_version(name, version)
        self.hidden.discard(key)

    def _lookup(self, name: str, version: int) -> Any:
        servable = self.runtime.registry.servables().get(name)
        return None if servable is None else servable.versions.get(version)

    def _announce(self, message: tuple) -> None:
        kind, name, version, index, count = message
        loaded = self._lookup(name, version)
        batcher = loaded.batchers.get(index) if loaded is not None else None
        if batcher is not None:
            (batcher.expect if kind == "expect" else batcher.arrive)(count)

    def _run(self, message: tuple, buffer: Buffer | None, source: Any) -> tuple:
        """One model call: ("run", servable, version, model index, rows, seconds
        left, announced, batched, subgraph) -> ("ok", results), a result per row:
        ("e", message, status), ("d", output descriptors) or ("a", output arrays).
        ``subgraph`` > 0 runs that graph of the model (unbatched, as in-process)."""
        from ..errors import InstanceError

        _, name, version, index, rows_in, remaining, announced, batched, subgraph = message
        self._last_call[(name, version)] = time.monotonic()
        loaded = self._lookup(name, version)
        if loaded is None or self._stopping:
            why = "the device process is stopping" if self._stopping else "it was unloaded"
            error = ("e", f"servable {name} version {version} is not available on this device: {why}", 503)
            return ("ok", [error] * len(rows_in))
        stage = loaded.stages.get(index) if not subgraph else loaded.subgraph_stages.get((index, subgraph))
        if stage is None:  # the front-end was told of a graph this version does not have
            error = ("e", f"servable {name} version {version} has no model {index} subgraph {subgraph} "
                          "on this device", 400)
            return ("ok", [error] * len(rows_in))
        rows = []
        for row in rows_in:
            rows.append(tuple(buffer.read(d) if isinstance(d, tuple) else d for d in row))  # type: ignore[union-attr]
        deadline = time.monotonic() + remaining
        epoch = self.runtime.epochs.enter()
        try:
            batcher = loaded.batchers.get(index) if batched and not subgraph else None
            if batcher is not None:
                results = batcher.run(rows, deadline, announced, source)
            else:
                results = stage.run(rows)
        finally:
            self.runtime.epochs.leave(epoch)
        del rows
        return ("ok", _encode_results(results, buffer, InstanceError))


def _encode_results(results: list, buffer: Buffer | None, error_type: type) -> list:
    """Results into the buffer (over the consumed inputs) when they fit, else inline."""
    encoded: list[Any] = []
    arrays: list[list[np.ndarray]] = []
    for result in results:
        if isinstance(result, error_type):
            encoded.append(("e", result.message, result.status))
            arrays.append([])
            continue
        values = [np.asarray(v) for v in result]
        scalars = [isinstance(v, np.generic) for v in result]
        encoded.append(("a", values, scalars))
        arrays.append(values)
    flat = [a for row in arrays for a in row]
    if buffer is None or not all(storable(a) for a in flat) or nbytes_of(flat) > buffer.size:
        return encoded  # inline: rare (object outputs, or more than the buffer holds)
    offset = 0
    for i, item in enumerate(encoded):
        if item[0] == "a":
            descs, offset = buffer.write(item[1], offset)
            encoded[i] = ("d", descs, item[2])
    return encoded
