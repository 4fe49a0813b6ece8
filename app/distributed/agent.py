"""The agent of one host (``mserve agent``): registers with the main host, beats, and
runs this host's JAX process when told to.

The agent itself never imports JAX's runtime: it holds the connection to the main
host, sends a heartbeat every `HEARTBEAT_INTERVAL` seconds, starts this host's
worker (`mserve.distributed.worker`) for each generation of the group, reports when
it exits, and kills it when the main host says so, when the main host goes away, or
at stop. A worker stuck in a collective (a peer died mid-batch) is simply killed: the
group restarts from fresh processes, which JAX's runtime needs.

When the main host is unreachable or goes away, the agent keeps trying to connect
(every second), so agents can be started before the main host and survive its
restarts, for up to ``wait_main`` seconds at a time (then `MainHostUnreachable`,
naming the address and what went wrong: an agent pointed at the wrong address
says so rather than waiting forever). A refusal (a host index a running agent
holds, another JAX version) is final.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .links import ChannelClosed, Link, connect, parse_address
from .worker import AGENT_PID_VARIABLE

HEARTBEAT_INTERVAL = 0.5
log = logging.getLogger("mserve.distributed.agent")


class AgentRefused(RuntimeError):
    """The main host will not take this agent (the reason says what to change)."""


class MainHostUnreachable(RuntimeError):
    """No main host answered at the distributed address within ``wait_main`` seconds."""


DEFAULT_WAIT_MAIN = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def jax_version() -> str:
    from importlib.metadata import version

    return version("jax")


@dataclass
class AgentSettings:
    distributed_address: str
    host_index: int | None  # None: the main host places it by rank_start or address (rank table)
    coordinator_port: int = 0  # host 0's JAX coordinator port; 0: a free one
    agent_ip: str | None = None  # how other hosts reach this one (host 0 only); None: as the main host sees it
    servable_directory: str | None = None  # where the servables are here; None: the main host's path
    retry_interval: float = 1.0
    rank_start: int | None = None  # MindSpore's startup_agents: this host's first rank in the rank table
    model_files: tuple[str, ...] = ()  # this host's copies of the model files, used instead of the servable's
    wait_main: float = DEFAULT_WAIT_MAIN  # seconds without a main host before giving up; 0: no limit


class Agent:
    def __init__(self, settings: AgentSettings):
        parse_address(settings.distributed_address)
        if settings.host_index is not None and settings.host_index < 0:
            raise ValueError(f"host index must be 0 or more, got {settings.host_index}")
        if settings.wait_main < 0:
            raise ValueError(f"wait_main must be >= 0 seconds (0: no limit), got {settings.wait_main}")
        self.settings = settings
        self.stopping = threading.Event()
        self.worker: subprocess.Popen | None = None
        self.generation = -1
        self.coordinator_port = settings.coordinator_port or free_port()
        self.connected = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve until `stop`; raises `AgentRefused` when the main host refuses us,
        `MainHostUnreachable` when none answers for ``wait_main`` seconds."""
        address, limit = self.settings.distributed_address, self.settings.wait_main
        announced_wait = False
        alone_since = time.monotonic()  # since the main host was last there
        while not self.stopping.is_set():
            try:
                link = connect(address, timeout=3.0)
            except OSError as exc:
                if not announced_wait:
                    log.info("waiting for the main host at %s%s", address,
                             f" (up to {limit:g} s)" if limit else "")
                    announced_wait = True
                if limit and time.monotonic() - alone_since >= limit:
                    raise MainHostUnreachable(
                        f"no main host answered at {address} for {limit:g} s ({exc.strerror or exc}): start "
                        f"`mserve start ... --distributed-address {address} --hosts N` there, or check the address "
                        f"and that its port is open from here"
                    ) from None
                self.stopping.wait(self.settings.retry_interval)
                continue
            announced_wait = False
            try:
                self._session(link)
            except (ChannelClosed, OSError, ValueError) as exc:  # OSError: no greeting in time
                if self.connected.is_set():
                    log.warning("lost the main host at %s; reconnecting", address)
                else:
                    log.warning("%s answered, but not as an mserve main host (%s); retrying", address,
                                exc or type(exc).__name__)
            finally:
                if self.connected.is_set():  # registered: the wait for a main host starts again
                    alone_since = time.monotonic()
                self.connected.clear()
                self._stop_worker()
                link.close()
            if limit and time.monotonic() - alone_since >= limit:
                raise MainHostUnreachable(f"no mserve main host answered at {address} for {limit:g} s: check the address")
            self.stopping.wait(self.settings.retry_interval)

    def stop(self) -> None:
        self.stopping.set()

    def _session(self, link: Link) -> None:
        link.send(("agent", {
            "index": self.settings.host_index, "jax": jax_version(), "hostname": socket.gethostname(),
            "coordinator_port": self.coordinator_port, "agent_ip": self.settings.agent_ip, "pid": os.getpid(),
            "rank_start": self.settings.rank_start,
            "model_paths": {os.path.basename(f): os.path.abspath(f) for f in self.settings.model_files},
        }))
        reply = link.recv(timeout=10.0)
        if reply[0] == "refused":
            raise AgentRefused(reply[1])
        if reply[0] == "busy":
            log.warning("%s; retrying", reply[1])
            return
        log.info("registered with the main host at %s as host %d", self.settings.distributed_address,
                 reply[1].get("index", -1))
        self.connected.set()
        next_beat = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_beat:
                link.send(("heartbeat",))
                next_beat = now + HEARTBEAT_INTERVAL
            self._watch_worker(link)
            try:
                message = link.recv(timeout=0.1)
            except socket.timeout:
                continue
            if message[0] == "start":
                self._start_worker(message[1])
            elif message[0] == "stop":
                self._stop_worker()

    # ------------------------------------------------------------------ the worker

    def _start_worker(self, orders: dict[str, Any]) -> None:
        self._stop_worker()
        orders = dict(orders)
        if self.settings.servable_directory:
            orders["servable_directory"] = self.settings.servable_directory
        self.generation = orders["generation"]
        log.info("starting this host's JAX process (generation %d, process %d of %d)",
                 self.generation, orders["index"], orders["hosts"])
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "mserve.distributed.worker"], stdin=subprocess.PIPE, text=True,
            env={**os.environ, AGENT_PID_VARIABLE: str(os.getpid())},  # it dies with this process
        )
        assert self.worker.stdin is not None
        self.worker.stdin.write(json.dumps(orders) + "\n")
        self.worker.stdin.close()

    def _watch_worker(self, link: Link) -> None:
        worker = self.worker
        if worker is None or worker.poll() is None:
            return
        self.worker = None
        link.send(("worker_exited", {"generation": self.generation, "code": worker.returncode}))

    def _stop_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is None or worker.poll() is not None:
            return
        worker.send_signal(signal.SIGKILL)  # may be stuck in a collective: no grace to give
        try:
            worker.wait(5.0)
        except subprocess.TimeoutExpired:
            log.error("this host's JAX process %d did not exit after SIGKILL", worker.pid)
