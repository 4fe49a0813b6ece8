"""The main host's side of a distributed servable: agents, generations, batches.

`DistributedGroup` listens on the distributed address. Agents (one per host, `agent`)
register there and beat every half second; once every host's agent is present and a
model is attached, the group starts a *generation*: each agent starts its host's JAX
process (`worker`), the processes join one JAX group (process 0 hosts JAX's
coordinator), load their shards, connect back and say they are ready; the group
compiles and runs every warm-up shape on all of them, then serves.

A batch (`run`) goes to every process in the same order; all run the same compiled
program, and process 0's outputs are the answer. Batches run one at a time: that
order is what keeps the processes' collectives matched.

Faults end the generation: an agent that stops beating (`heartbeat_timeout`) or
disconnects, a JAX process that exits, fails or does not answer a batch in time. The
group then tells every agent to kill its process (one stuck in a collective cannot be
saved), answers 503 naming what is missing, and starts a new generation as soon as
every host's agent is present again. Nothing waits on JAX to notice a dead peer.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import ServingError
from ..ops.metrics import HOST_BATCHES
from .links import ChannelClosed, Link, listen, parse_address

log = logging.getLogger("mserve.distributed")


# An agent heard from within this many seconds is alive (it beats every 0.5 s): a
# second agent asking for its host index is refused, not told to retry.
LIVE_BEAT = 1.5


class GroupUnavailable(ServingError):
    """The group cannot run a batch now (503; the message says what is missing)."""

    status = 503


class GroupLoadError(RuntimeError):
    """The model cannot be served by the group (a host refused it, or it never came)."""


@dataclass
class ModelOrders:
    """What every host's JAX process loads (the main host's paths and digests)."""

    servable_directory: str
    servable: str
    version: int
    model_files: list[str]
    digests: dict[str, str]  # path relative to the servable's folder -> sha256
    model_format: str = "jax_function"  # or "jax_distributed": a model file (`model_module`)
    devices: int = 0  # devices the group must have in all (MindSpore's rank_size); 0: any


@dataclass
class AgentLink:
    index: int
    link: Link
    info: dict[str, Any]
    last_beat: float = field(default_factory=time.monotonic)


@dataclass
class GroupSettings:
    distributed_address: str
    hosts: int
    wait_agents: float = 0.0  # seconds start-up waits for every host; 0: no limit
    heartbeat_timeout: float = 3.0
    init_timeout: float = 120.0  # a generation's join + load + warm-up, per step
    run_timeout: float = 60.0  # one batch on the group
    # From MindSpore's rank table (`mindspore_api`): per host, its address and first
    # rank, so agents started without a host index are placed by either.
    host_ips: list[str] | None = None
    rank_starts: list[int] | None = None


class DistributedGroup:
    def __init__(self, settings: GroupSettings):
        parse_address(settings.distributed_address)
        if settings.hosts < 1:
            raise ValueError(f"hosts must be 1 or more, got {settings.hosts}")
        self.settings = settings
        self.orders: ModelOrders | None = None
        self.generation = 0
        self.state = "waiting"  # waiting -> starting -> ready -> broken -> starting ...
        self.reason = "no model attached yet"
        self.failure: str | None = None  # why a generation failed to start (a model error stays)
        self.reports: dict[int, dict[str, Any]] = {}  # host -> what its JAX process holds
        self.restarts = 0
        self.batches = 0
        self._agents: dict[int, AgentLink] = {}
        self._workers: dict[int, Link] = {}  # of this generation
        self._arrived: dict[int, Link] = {}  # worker links not yet taken by a generation
        self._warm_shapes: list[tuple[tuple[int, ...], ...]] = []
        self._dtypes: list[np.dtype] = []
        self._cond = threading.Condition()
        self._run_lock = threading.Lock()
        self._closed = threading.Event()
        self._retry_at = 0.0
        self._failed_starts = 0  # generations that failed since the group last served
        self._served = False  # whether any generation has served
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._seq = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "DistributedGroup":
        self._listener = listen(self.settings.distributed_address)
        self._listener.settimeout(0.5)
        for target, name in ((self._accept, "accept"), (self._supervise, "supervise")):
            thread = threading.Thread(target=target, name=f"mserve-distributed-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("distributed group: waiting for %d host(s) on %s", self.settings.hosts, self.address)
        return self

    @property
    def address(self) -> str:
        if self._listener is None:
            return self.settings.distributed_address
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        """Stop every host's JAX process, drop the agents (they keep waiting for a
        main host), stop listening. Never waits on a JAX process."""
        self._closed.set()
        with self._cond:
            self._end_generation("the server is stopping", count=False)
            for agent in self._agents.values():
                agent.link.close()
            self._agents.clear()
            self._cond.notify_all()
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(2.0)

    # ------------------------------------------------------------------ the model

    def attach(self, orders: ModelOrders, dtypes: Sequence[np.dtype]) -> None:
        """The model every host serves. Another version of the served one (hot reload)
        replaces it: every host's JAX process holds one version at a time, so the group
        ends its generation and the hosts load the new version (503 meanwhile)."""
        with self._cond:
            if self.orders is not None and self.orders != orders:
                served = f"{self.orders.servable} version {self.orders.version}"
                if orders.servable != self.orders.servable:
                    raise GroupLoadError(f"this server's distributed group already serves {served}; one distributed "
                                         f"model per server")
                log.info("distributed group: every host loads %s version %d in place of version %d (503 meanwhile)",
                         orders.servable, orders.version, self.orders.version)
                self._replace(orders, dtypes, [])
                return
            self.orders = orders
            self._dtypes = [np.dtype(d) for d in dtypes]
            if self.state == "waiting":
                self.reason = self._missing_text() or "starting"
            self._cond.notify_all()

    def served(self) -> tuple[ModelOrders | None, list[np.dtype], list[tuple[tuple[int, ...], ...]]]:
        """What the group serves (the model, its input dtypes, its warm-up shapes), to
        `restore` should a version that replaces it fail to load."""
        with self._cond:
            return self.orders, list(self._dtypes), list(self._warm_shapes)

    def restore(self, orders: ModelOrders, dtypes: Sequence[np.dtype],
                warm_shapes: Sequence[tuple[tuple[int, ...], ...]]) -> None:
        """Serve again what `served` returned (a new version failed to load)."""
        with self._cond:
            log.warning("distributed group: every host loads %s version %d again", orders.servable, orders.version)
            self._replace(orders, dtypes, warm_shapes)

    def _replace(self, orders: ModelOrders, dtypes: Sequence[np.dtype],
                 warm_shapes: Sequence[tuple[tuple[int, ...], ...]]) -> None:
        """(Holding the lock.) End the generation; the next one loads ``orders`` at once."""
        self._end_generation(f"loading {orders.servable} version {orders.version}", count=False)
        self.orders = orders
        self._dtypes = [np.dtype(d) for d in dtypes]
        self._warm_shapes = list(warm_shapes)
        self.failure = None
        self._served = False  # a model error of this version fails its load (`wait_ready`)
        self._retry_at, self._failed_starts = 0.0, 0
        self._cond.notify_all()

    def wait_ready(self) -> None:
        """Block until the group first serves; `GroupLoadError` when a host reports a
        model error, or when ``wait_agents`` seconds pass first (the error names the
        hosts that did not come)."""
        limit = self.settings.wait_agents
        deadline = time.monotonic() + limit if limit > 0 else None
        with self._cond:
            while self.state != "ready":
                if self._closed.is_set():
                    raise GroupLoadError("the server stopped while waiting for the distributed group")
                if self.failure is not None:
                    raise GroupLoadError(self.failure)
                if deadline is not None and time.monotonic() >= deadline:
                    raise GroupLoadError(
                        f"the distributed group was not ready within {limit:g} s: {self.reason}"
                    )
                self._cond.wait(0.2)

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        """Compile and run every shape on the group now, and again on every new
        generation before it serves."""
        key_list = [tuple(tuple(s) for s in one) for one in shapes]
        with self._cond:
            for key in key_list:
                if key not in self._warm_shapes:
                    self._warm_shapes.append(key)
        for key in key_list:
            try:
                self.run([np.zeros(s, d) for s, d in zip(key, self._dtypes)], timeout=self.settings.init_timeout)
            except GroupUnavailable:  # a host went away meanwhile:
                self.wait_ready()  # the next generation runs every listed shape before it serves
                return

    # ------------------------------------------------------------------ status

    def readiness(self) -> tuple[bool, str]:
        with self._cond:
            if self.state == "ready":
                return True, "ready"
            return False, f"distributed servable: {self.reason}"

    def _missing_text(self) -> str:
        missing = [i for i in range(self.settings.hosts) if i not in self._agents]
        if not missing:
            return ""
        names = ", ".join(map(str, missing))
        return (f"waiting for host{'s' if len(missing) > 1 else ''} {names} (no agent connected to {self.address}; "
                f"start `mserve agent --distributed-address {self.address} --host-index {missing[0]}` there)")

    # ------------------------------------------------------------------ batches

    def run(self, arrays: Sequence[np.ndarray], timeout: float | None = None,
            version: int | None = None) -> list[np.ndarray]:
        """Run one batch on every process of the group; process 0's outputs.
        ``version``: the caller's model version; another one served (a reload that
        has replaced it) is a 503, never another version's answer."""
        with self._cond:
            if version is not None and self.orders is not None and version != self.orders.version:
                raise GroupUnavailable(f"version {version} is no longer served by the distributed group: it "
                                       f"serves version {self.orders.version} now")
            if self.state != "ready" and not (self.state == "starting" and threading.current_thread().name
                                              == "mserve-distributed-supervise"):
                raise GroupUnavailable(f"distributed servable not ready: {self.reason}")
        with self._run_lock:
            with self._cond:
                generation = self.generation
                workers = dict(self._workers)
            if len(workers) != self.settings.hosts:
                raise GroupUnavailable(f"distributed servable not ready: {self.reason}")
            self._seq += 1
            seq = self._seq
            message = ("run", seq, [np.ascontiguousarray(a) for a in arrays])
            index = 0
            try:
                for index, link in sorted(workers.items()):
                    link.send(message)
                outputs = None
                limit = time.monotonic() + (timeout or self.settings.run_timeout)
                for index, link in sorted(workers.items()):
                    reply = self._reply(link, seq, limit)
                    HOST_BATCHES.labels(str(index)).inc()
                    if index == 0:
                        outputs = reply
            except (ChannelClosed, OSError, socket.timeout) as exc:
                what = "did not answer in time" if isinstance(exc, socket.timeout) else "is gone"
                self._fail(generation, f"host {index}'s JAX process {what} during a batch")
                raise GroupUnavailable(f"distributed servable not ready: host {index}'s JAX process {what}; "
                                       f"restarting the group") from None
            self.batches += 1
            return list(outputs)

    def _reply(self, link: Link, seq: int, limit: float) -> Any:
        while True:
            left = limit - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            message = link.recv(timeout=left)
            if message[0] == "done" and message[1] == seq:
                return message[2]
            if message[0] == "error" and message[1] == seq:
                raise ValueError(message[2])

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            link = Link(sock, f"{peer[0]}:{peer[1]}")
            threading.Thread(target=self._greet, args=(link, peer[0]), name="mserve-distributed-greet",
                             daemon=True).start()

    def _greet(self, link: Link, peer_ip: str) -> None:
        try:
            kind, info = link.recv(timeout=10.0)
        except (ChannelClosed, socket.timeout, ValueError, TypeError):
            link.close()
            return
        if kind == "worker":
            with self._cond:
                self._arrived[int(info["index"])] = link
                self._cond.notify_all()
            return
        if kind != "agent":
            link.close()
            return
        info = dict(info)
        if info.get("index") is None:
            info["index"] = self._place(info, peer_ip)
        refusal = self._refusal(info)
        if refusal:
            try:
                link.send(("refused", refusal))
            finally:
                link.close()
            log.warning("refused an agent from %s: %s", peer_ip, refusal)
            return
        info = dict(info, peer_ip=peer_ip)
        agent = AgentLink(int(info["index"]), link, info)
        with self._cond:
            holder = self._agents.get(agent.index)
            if holder is not None:
                where = f"an agent on {holder.info.get('peer_ip')} (pid {holder.info.get('pid')})"
                if time.monotonic() - holder.last_beat < LIVE_BEAT:  # beating: a second agent for one place
                    reason = (f"host index {agent.index} is already taken by {where}, which is running: give this "
                              f"agent another --host-index (0-{self.settings.hosts - 1}), or stop that one first")
                    log.warning("refused an agent from %s: %s", peer_ip, reason)
                    link.send(("refused", reason))
                else:  # maybe this host's previous agent, gone but not yet noticed: the agent retries
                    link.send(("busy", f"host index {agent.index} is still held by {where}, silent for "
                                       f"{time.monotonic() - holder.last_beat:.1f} s"))
                link.close()
                return
            self._agents[agent.index] = agent
            link.send(("welcome", {"hosts": self.settings.hosts, "index": agent.index}))
            log.info("host %d: agent connected from %s (%s)", agent.index, peer_ip, info.get("hostname"))
            if self.state == "waiting" or self.state == "broken":
                self.reason = self._missing_text() or "starting"
            self._cond.notify_all()
        self._listen_to_agent(agent)

    def _place(self, info: dict[str, Any], peer_ip: str) -> int | None:
        """The host index of an agent that gave none: by its first rank, else by its
        address, as listed in the rank table."""
        starts, ips = self.settings.rank_starts or [], self.settings.host_ips or []
        if info.get("rank_start") is not None:
            return starts.index(info["rank_start"]) if info["rank_start"] in starts else None
        address = info.get("agent_ip") or peer_ip
        matches = [i for i, ip in enumerate(ips) if ip == address]
        if len(matches) == 1:
            return matches[0]
        return 0 if self.settings.hosts == 1 else None

    def _refusal(self, info: dict[str, Any]) -> str:
        from .agent import jax_version

        try:
            index = int(info["index"])
        except (KeyError, TypeError, ValueError):
            if self.settings.rank_starts:
                return (f"no host of the rank table starts at rank {info.get('rank_start')} or has the address "
                        f"{info.get('agent_ip') or 'this agent connects from'} (first ranks: {self.settings.rank_starts}, "
                        f"addresses: {self.settings.host_ips}): give agent_ip and rank_start")
            return "the agent sent no host index"
        if not 0 <= index < self.settings.hosts:
            return (f"host index {index} is out of range: the main host serves {self.settings.hosts} host(s), "
                    f"indices 0-{self.settings.hosts - 1}")
        ours = jax_version()
        if info.get("jax") != ours:
            return f"this host has jax {info.get('jax')}, the main host jax {ours}: install the same version on every host"
        return ""

    def _listen_to_agent(self, agent: AgentLink) -> None:
        """Heartbeats and reports of one agent, until it goes quiet or away."""
        reason = None
        while not self._closed.is_set():
            try:
                message = agent.link.recv(timeout=self.settings.heartbeat_timeout)
            except socket.timeout:
                reason = f"host {agent.index}'s agent stopped beating (no heartbeat for {self.settings.heartbeat_timeout:g} s)"
                break
            except ChannelClosed:
                reason = f"host {agent.index}'s agent disconnected"
                break
            agent.last_beat = time.monotonic()
            if message[0] == "worker_exited":
                info = message[1]
                with self._cond:
                    current = info.get("generation") == self.generation
                if current:
                    self._fail(info["generation"], f"host {agent.index}'s JAX process exited (code {info.get('code')})")
        agent.link.close()
        with self._cond:
            if self._agents.get(agent.index) is agent:
                del self._agents[agent.index]
                if reason and not self._closed.is_set():
                    log.warning("%s", reason)
                    self._end_generation(reason)
                    self.reason = f"{reason}; {self._missing_text()}"
            self._cond.notify_all()

    # ------------------------------------------------------------------ generations

    def _fail(self, generation: int, reason: str) -> None:
        with self._cond:
            if generation != self.generation or self.state not in ("starting", "ready"):
                return
            log.warning("distributed group generation %d failed: %s", generation, reason)
            self._end_generation(reason)
            self._cond.notify_all()

    def _end_generation(self, reason: str, count: bool = True) -> None:
        """(Holding the lock.) Kill every host's JAX process and drop their links."""
        if self.state in ("starting", "ready"):
            for agent in self._agents.values():
                try:
                    agent.link.send(("stop", {"generation": self.generation}))
                except OSError:
                    pass
            if count:
                self.restarts += 1
            self.state = "broken"
            # a group that keeps failing is retried less and less often (1, 2, 4 ... 30 s)
            self._retry_at = time.monotonic() + min(2.0 ** self._failed_starts, 30.0)
            self._failed_starts += 1
        for link in [*self._workers.values(), *self._arrived.values()]:
            link.close()
        self._workers.clear()
        self._arrived.clear()
        self.reports.clear()
        self.reason = f"{reason}; restarting the group" if count else reason

    def _supervise(self) -> None:
        while not self._closed.is_set():
            with self._cond:
                startable = (
                    self.orders is not None and self.state in ("waiting", "broken")
                    and len(self._agents) == self.settings.hosts and time.monotonic() >= self._retry_at
                    and self.failure is None
                )
                if not startable:
                    self._cond.wait(0.2)
                    continue
                self.generation += 1
                self.state = "starting"
                self.reason = f"starting generation {self.generation} on {self.settings.hosts} host(s)"
                generation = self.generation
                self._send_start(generation)
            try:
                self._bring_up(generation)
            except _StartFailed as exc:
                self._fail(generation, str(exc))
            except GroupUnavailable:
                pass  # _fail already ended the generation
            except Exception as exc:  # a warm-up batch the hosts refused, say
                self._fail(generation, f"starting the group failed: {type(exc).__name__}: {exc}")

    def _send_start(self, generation: int) -> None:
        assert self.orders is not None
        first = self._agents[0].info
        host0 = first.get("agent_ip") or first["peer_ip"]
        host0 = f"[{host0}]" if ":" in host0 else host0
        coordinator = f"{host0}:{first['coordinator_port']}"
        for index, agent in self._agents.items():
            agent.link.send(("start", {
                "generation": generation, "index": index, "hosts": self.settings.hosts, "coordinator": coordinator,
                "main": self._reachable_address(agent), "init_timeout": self.settings.init_timeout,
                "model_paths": agent.info.get("model_paths") or {}, **self.orders.__dict__,
            }))

    def _reachable_address(self, agent: AgentLink) -> str:
        """Where the agent's worker connects back: the address the agent reached."""
        host, port = parse_address(self.address)
        if host in ("0.0.0.0", "::", ""):
            sock_host = agent.link.sock.getsockname()[0]
            host = sock_host
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port}"

    def _bring_up(self, generation: int) -> None:
        """Collect this generation's JAX processes, wait until each has loaded, warm
        the group up, then serve."""
        deadline = time.monotonic() + self.settings.init_timeout
        with self._cond:
            while len(self._arrived) < self.settings.hosts:
                if self._abandoned(generation):
                    return
                if time.monotonic() >= deadline:
                    raise _StartFailed(f"host(s) {sorted(set(range(self.settings.hosts)) - set(self._arrived))} "
                                       f"started no JAX process within {self.settings.init_timeout:g} s")
                self._cond.wait(0.2)
            self._workers = dict(self._arrived)
            self._arrived = {}
            workers = dict(self._workers)
        for index, link in sorted(workers.items()):
            while True:
                with self._cond:
                    if self._abandoned(generation):
                        return
                if time.monotonic() >= deadline:
                    raise _StartFailed(f"host {index}'s JAX process did not load within {self.settings.init_timeout:g} s")
                try:
                    message = link.recv(timeout=0.5)
                except socket.timeout:
                    continue
                except ChannelClosed:
                    raise _StartFailed(f"host {index}'s JAX process exited while loading") from None
                if message[0] == "failed":
                    with self._cond:
                        if not self._served:  # a model error at start-up: the load fails with it
                            self.failure = message[1]
                        self._cond.notify_all()
                    raise _StartFailed(message[1])
                if message[0] == "ready":
                    with self._cond:
                        self.reports[index] = message[1]
                    break
        with self._cond:
            shapes = list(self._warm_shapes)
        for key in shapes:
            self.run([np.zeros(s, d) for s, d in zip(key, self._dtypes)], timeout=self.settings.init_timeout)
        with self._cond:
            if self.generation == generation and self.state == "starting":
                self.state = "ready"
                self.reason = "ready"
                self._failed_starts = 0
                self._served = True
                log.info("distributed group generation %d ready on %d host(s)", generation, self.settings.hosts)
            self._cond.notify_all()

    def _abandoned(self, generation: int) -> bool:
        """(Holding the lock.) Whether a generation being brought up has ended: a
        host went away meanwhile (it is broken), a newer one began, or the group closed."""
        return self.generation != generation or self.state != "starting" or self._closed.is_set()

    def process_reports(self, timeout: float = 10.0) -> dict[int, dict[str, Any]]:
        """Ask every JAX process what it holds now (shards, resident memory)."""
        with self._run_lock:
            with self._cond:
                workers = dict(self._workers)
            reports = {}
            for index, link in sorted(workers.items()):
                link.send(("report", index))
            for index, link in sorted(workers.items()):
                message = link.recv(timeout=timeout)
                reports[index] = message[2]
            return reports


class _StartFailed(RuntimeError):
    """A generation could not be brought up (the message says which host and why)."""
