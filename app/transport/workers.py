"""Front-end processes: several server processes on one listening socket.

One Python process serves the HTTP front end, the codec and the pipeline on one
core, whatever its thread count (the GIL). `WorkerPool` binds the port once and
starts N worker processes that inherit the socket. With a ``manifest`` (the
default architecture, see `mserve.devices`) they are front-ends: they run HTTP,
JSON and the Python stages, and send model calls to the device processes that the
manifest lists; they never load a model, and they run with ``JAX_PLATFORMS=cpu``
and no visible GPU, so nothing in them (a servable_config.py that uses jax.numpy,
say) can create an accelerator client. Without one, each worker loads every
servable itself (a whole server per process, as before device processes).
Workers and front-ends may also serve gRPC (``grpc`` settings): it is not inherited,
every process binds the gRPC port itself with SO_REUSEPORT, so the kernel spreads new
gRPC connections over them. With device processes, ``start_grpc_server``
starts a pool of its own with no REST socket (``sock=None``): its front-ends serve
gRPC only.

The workers take turns accepting through a shared table (balance.py), over HTTP
and HTTPS, so keep-alive connections spread evenly and a worker that is still
loading (a replacement) takes no client. The pool restarts a
worker that dies. On stop it writes ``STOP <drain seconds>`` to every worker's
stdin: each stops accepting, answers what it has received within that drain
timeout and exits; the pool kills whichever is still running a second later. A
worker ignores SIGINT (Ctrl+C reaches the whole process group: the pool decides
how the workers stop); a SIGTERM from elsewhere drains with the default 30 s.

Each worker runs ``python -m mserve.runtime.frontend_role``: it reads its
settings as one line of JSON on stdin (then its orders, as above), reports
``LISTENING`` once the port is served (a
front-end answers ``/health`` 200 and ``/ready`` 503 while the device processes
load) and ``READY <json description>`` once it serves the servables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from ..lifetime import start_child, stop_processes
from ..ops.child_stderr import StderrRelay
from .balance import ConnectionBalance

log = logging.getLogger("mserve.transport.workers")


def _config_to_json(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["servable_directory"] = os.fspath(config.servable_directory)
    return data


class WorkerPool:
    """N worker processes serving ``configs`` on ``sock`` (None: no REST, the
    front-ends serve only the ``grpc`` settings' port)."""

    def __init__(
        self,
        configs: Sequence[Any],
        sock: socket.socket | None,
        workers: int,
        restful: dict[str, Any] | None = None,
        ssl_config: Any = None,
        log_level: int = logging.INFO,
        ready_timeout: float = 600.0,
        poll_interval: float | None = None,
        manifest: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        access_log: bool | None = None,
        grpc: dict[str, Any] | None = None,
    ):
        self.sock = sock
        self.manifest = manifest
        self.env = env
        self.workers = workers
        self.ready_timeout = ready_timeout
        self.settings = {
            "configs": [_config_to_json(c) for c in configs],
            "restful": dict(restful or {}),
            "ssl_config": dataclasses.asdict(ssl_config) if ssl_config is not None else None,
            "fd": sock.fileno() if sock is not None else None,
            "log_level": log_level,
            # None: one access line per request when log_level lets INFO through
            "access_log": access_log if access_log is not None else log_level <= logging.INFO,
            "poll_interval": poll_interval,
            "grpc": grpc,  # start_grpc_server arguments; every worker binds the port with SO_REUSEPORT
            "manifest": os.fspath(manifest) if manifest is not None else None,
        }
        # The workers take turns accepting on the shared socket (HTTP and HTTPS alike: one
        # Waitress loop); a worker still loading (a replacement) declines its turns.
        self.balance_fd = ConnectionBalance.create_table(workers) if sock is not None and workers > 1 else None
        self.settings["balance_fd"] = self.balance_fd
        self.bells = ConnectionBalance.create_bells(workers) if self.balance_fd is not None else []
        self.settings["bells"] = self.bells
        self.settings["workers"] = workers
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self.relays: list[StderrRelay] = []  # one per process started: its log lines, copied out
        self.restarts = 0  # replacements that came up and serve
        self.description: list[Any] = []
        self._stopping = False
        self._watcher: threading.Thread | None = None

    def _spawn(self, index: int) -> subprocess.Popen:
        fds = [self.sock.fileno()] if self.sock is not None else []
        fds += [self.balance_fd] if self.balance_fd is not None else []
        fds += [fd for bell in self.bells for fd in bell]
        env = dict(self.env if self.env is not None else os.environ)
        if self.manifest is not None:
            env.update(frontend_env())
        proc = start_child(
            [sys.executable, "-m", "mserve.runtime.frontend_role"], f"worker-{index}",
            {signal.SIGTERM, signal.SIGUSR1}, self.relays,  # it waits for them (sigwait)
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds, text=True, env=env,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({**self.settings, "index": index}) + "\n")
        proc.stdin.flush()  # stdin stays open: the pool's orders (STOP) follow
        return proc

    def _wait_ready(self, proc: subprocess.Popen, listening: bool = False) -> Any:
        """Read the worker's reports up to READY (or LISTENING, with ``listening``)."""
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ready_timeout
        for line in proc.stdout:
            if listening and line.startswith("LISTENING"):
                return None
            if line.startswith("READY "):
                return json.loads(line[6:])
            if line.startswith("FAILED "):
                raise RuntimeError(line[7:].strip())
            if time.monotonic() > deadline:
                break
        code = proc.wait()
        raise RuntimeError(f"worker process exited with code {code} before serving")

    def start(self, loaded: bool = True) -> list[Any]:
        """Start every worker; returns once all serve (the description of worker 0's
        servables), or raises the first worker's load error after stopping the rest.
        ``loaded=False`` (front-ends whose device processes are not started yet):
        return once all listen; `wait_loaded` waits for the rest."""
        try:
            for i in range(self.workers):
                self.procs[i] = self._spawn(i)
            if not loaded:
                for p in self.procs:
                    self._wait_ready(p, listening=True)  # type: ignore[arg-type]
                return []
            self.wait_loaded()
        except BaseException:
            self.stop(drain_timeout=5)
            raise
        return self.description

    def wait_loaded(self) -> list[Any]:
        """Wait for every worker to serve the servables (after `start(loaded=False)`)."""
        if self._watcher is not None:
            return self.description
        descriptions = [self._wait_ready(p) for p in self.procs if p is not None]
        self.description = descriptions[0]
        self._watcher = threading.Thread(target=self._watch, name="mserve-workers", daemon=True)
        self._watcher.start()
        return self.description

    def _watch(self) -> None:
        """Replace workers that die while the pool serves."""
        while not self._stopping:
            time.sleep(0.5)
            for i, proc in enumerate(self.procs):
                if self._stopping or proc is None or proc.poll() is None:
                    continue
                log.error("worker %d (pid %d) exited with code %s; starting a new one", i, proc.pid, proc.returncode)
                if self.balance_fd is not None:
                    ConnectionBalance.forget(self.balance_fd, self.workers, i)
                try:
                    self.procs[i] = self._spawn(i)
                    self._wait_ready(self.procs[i])  # type: ignore[arg-type]
                    self.restarts += 1
                except Exception as exc:
                    log.error("restarting worker %d failed: %s", i, exc)

    def begin_shutdown(self) -> None:
        """Front-ends answer ``/ready`` with 503 from now on (SIGUSR1), still serving."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None and self.manifest is not None:
                proc.send_signal(signal.SIGUSR1)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """SIGTERM every worker (they drain), then wait; kill what outlives the drain."""
        self._stopping = True
        stop_processes([p for p in self.procs if p is not None], drain_timeout, ask=_order_stop(drain_timeout))
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.returncode:  # a clean stop exits 0; anything else is worth a line
                log.warning("worker %d (pid %d) exited with code %s at stop", i, proc.pid, proc.returncode)
        relays, self.relays = self.relays, []
        for relay in relays:  # the workers' last lines (they have exited)
            relay.join()
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        if self.sock is not None:
            self.sock.close()
        if self.balance_fd is not None:
            os.close(self.balance_fd)
            self.balance_fd = None
        for bell in self.bells:
            for fd in bell:
                os.close(fd)
        self.bells = []


def _order_stop(drain_timeout: float) -> Callable[[subprocess.Popen], None]:
    def order(proc: subprocess.Popen) -> None:
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"STOP {drain_timeout}\n")
            proc.stdin.flush()
        except (OSError, ValueError):  # its stdin is gone: a signal still reaches it
            proc.send_signal(signal.SIGTERM)

    return order


class PoolOrders:
    """The pool's orders to this worker, read from stdin by a thread: ``STOP
    <seconds>`` sets the drain timeout and raises SIGTERM, which the main thread
    waits for."""

    def __init__(self) -> None:
        self.drain_timeout = 30.0
        threading.Thread(target=self._read, name="mserve-orders", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            word, _, value = line.strip().partition(" ")
            if word == "STOP":
                try:
                    self.drain_timeout = max(float(value), 0.0)
                except ValueError:
                    log.error("pool order %r: not a drain timeout; draining up to %gs", line, self.drain_timeout)
                os.kill(os.getpid(), signal.SIGTERM)


def frontend_env() -> dict[str, str]:
    """What a front-end process runs with: JAX (if a servable_config.py imports it)
    on the CPU only, no GPU visible, and the in-process server mode."""
    return {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "MSERVE_PROCESSES": "single"}
