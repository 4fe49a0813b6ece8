"""The server API, MindSpore Serving's ``server`` module in shape.

    from mserve import server

    server.start_servables(server.ServableStartConfig("servables", "add"))
    server.start_restful_server("127.0.0.1:5500")
    ...
    server.stop()

``start_*`` return once the servables are loaded and warm, and the socket listens;
the server runs in background threads until `stop`. As with MindSpore Serving, a
start script may simply end after ``start_restful_server`` or ``start_grpc_server``:
the process keeps serving until SIGINT or SIGTERM, then stops gracefully and exits 0
(`mserve.lifetime`). Every listener, REST or gRPC, is in ``_state.transports``
(each with ``stop(drain_timeout)``), so that keep-alive and `stop` cover both alike.

`ServableStartConfig` takes MindSpore Serving's parameters, in its order, with its
defaults and checks (``RuntimeError`` with ``Parameter '...'`` messages).

mserve additions (operability):

* Readiness: `readiness` (``GET /ready``) is true only once every configured
  servable is loaded and warm, and false again from the first moment of `stop`. Call
  `start_restful_server` first and `start_servables` second to answer ``/health``
  (200) and ``/ready`` (503) while models load; predicts meanwhile get 503.
* Hot reload: ``start_servables(..., poll_interval=2.0)`` watches the version
  folders (see `mserve.serving.reload`); off by default.
* Graceful stop: ``stop(drain_timeout, grace)``: ``/ready`` turns 503 at once, new
  requests are still served for ``grace`` seconds (so load balancers notice), then
  the listener closes and in-flight requests finish, up to ``drain_timeout``.
* Metrics: batch and model hooks go to `mserve.ops.metrics` (``GET /metrics``).

Processes (see `mserve.devices` and README "Processes: front-ends and device
processes"): by default `start_servables` starts one device process per device,
which alone loads and runs the models, and `start_restful_server` starts
``workers`` front-end processes on the port (default `default_workers`: one per
CPU core, at most 8; ``MSERVE_WORKERS`` overrides it), which do HTTP, JSON and the
Python stages and send model calls to the device processes; `start_grpc_server`
starts front-ends of its own for gRPC, all on one port with SO_REUSEPORT.
``use_processes("single")`` (or ``MSERVE_PROCESSES=single``) keeps everything in
this process instead, as the tests and the device and front-end processes
themselves do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import lifetime
from .ops import metrics
from .transport.balance import ConnectionBalance
from .errors import ServableLoadError
from .transport.wsgi import create_app
from .transport.inline import InlinePolicy
from .serving.dataplane import DEFAULT_MAX_INSTANCES, Dataplane, PredictHandler
from .serving.compile_cache import enable_compile_cache
from .serving.reload import RequestEpochs, VersionWatcher, WatchTarget
from .serving.servable import (
    BatchSettings, LoadedVersion, Servable, ServableRegistry, list_versions, load_definition, load_version,
)
from .transport.http import ConnectionLimits, WaitressTransport, bind_socket, parse_address
from .transport.memory import limit_arenas

log = logging.getLogger("mserve.server")


DEVICE_TYPES = ("ascend", "gpu", "cpu")


@dataclass
class ServableStartConfig:
    """Which servable to load, and where: MindSpore Serving's ``ServableStartConfig``.

    ``servable_directory`` holds the folder ``servable_name``; a relative directory is
    taken from the start script's own folder (``sys.argv[0]``), as MindSpore does.
    ``version_number=0`` loads the newest version folder, a number that one (mserve:
    a list loads several). ``device_ids``: an int or a sequence of them (``None``:
    the default device, id 0) of ``device_type``: ``"CPU"``, ``"GPU"``, ``"Ascend"``
    (any case; it must be one an installed backend runs on), or ``None``: each
    model's backend picks its default. A model that declares a sharding is one
    instance spanning all of them. ``num_parallel_workers`` (0..64) sizes the thread
    pool of per-instance Python stages. ``dec_key`` (bytes of length 16, 24 or 32)
    and ``dec_mode`` (``AES-GCM``/``AES-CBC``) are checked here; loading fails unless
    the model's backend can decrypt.
    """

    servable_directory: str | os.PathLike
    servable_name: str
    device_ids: int | Sequence[int] | None = None
    version_number: int | Sequence[int] = 0
    device_type: str | None = None
    num_parallel_workers: int = 0
    dec_key: bytes | None = None
    dec_mode: str = "AES-GCM"
    # mserve additions: batching of models with a batch dimension (see BatchSettings).
    max_batch_size: int = 32
    batch_sizes: Sequence[int] | None = None
    max_batch_delay_ms: float = 2.0
    batching: bool = True
    # With device processes: a model of at most this many KiB of files, on the CPU,
    # not batched across requests, also gets a copy in each front-end, which runs it
    # on its HTTP I/O thread (a round trip to the device process costs more than such
    # a model's whole call). 0: never. Never for accelerators. See mserve.devices.
    frontend_copy_max_kb: float = 256.0

    def __post_init__(self) -> None:
        self.check()
        self.servable_directory = script_relative(self.servable_directory)
        self.device_ids = _int_tuple("device_ids", self.device_ids, 0) if self.device_ids is not None else None

    def check(self) -> None:
        """MindSpore Serving's checks and messages (``RuntimeError``); called again by
        `start_servables`, so a field changed after construction is checked too."""
        directory = self.servable_directory
        if not isinstance(directory, os.PathLike):  # mserve also takes a pathlib.Path
            _check_str("servable_directory", directory)
        _check_str("servable_name", self.servable_name)
        if isinstance(self.version_number, (list, tuple)):  # mserve: several versions
            if not self.version_number:
                raise RuntimeError("Parameter 'version_number' should not be an empty list")
            _int_tuple("version_number", self.version_number, 0)
        else:
            _check_int("version_number", self.version_number, 0)
        _check_int("num_parallel_workers", self.num_parallel_workers, 0, 64)
        if self.dec_key is not None:
            if not isinstance(self.dec_key, bytes):
                raise RuntimeError(f"Parameter 'dec_key' should be bytes, but actually {type(self.dec_key)}")
            if not self.dec_key:
                raise RuntimeError("Parameter 'dec_key' should not be empty bytes")
            if len(self.dec_key) not in (16, 24, 32):
                raise RuntimeError(f"Parameter 'dec_key' length {len(self.dec_key)} expected to be 16, 24 or 32")
        _check_str("dec_mode", self.dec_mode)
        if self.dec_mode not in ("AES-GCM", "AES-CBC"):
            raise RuntimeError("Parameter 'dec_mode' expected to be 'AES-GCM' or 'AES-CBC'")
        if self.device_ids is not None:
            _int_tuple("device_ids", self.device_ids, 0)
        validate_device_type(self.device_type)

    def versions(self) -> list[int]:
        return [self.version_number] if isinstance(self.version_number, int) else list(self.version_number)

    def device_list(self) -> list[int]:
        if self.device_ids is None:
            return [0]
        return [self.device_ids] if isinstance(self.device_ids, int) else list(self.device_ids)


def validate_device_type(device_type: str | None) -> None:
    """``None``, or one of MindSpore Serving's device types in any case."""
    if device_type is None:
        return
    _check_str("device_type", device_type)
    if device_type.lower() not in DEVICE_TYPES + ("none",):
        raise RuntimeError(
            f"Unsupported device type '{device_type}', only support 'Ascend', 'GPU', 'CPU' and None, case ignored"
        )


def script_relative(directory: str | os.PathLike) -> str:
    """An absolute servable directory: a relative one is taken from the start
    script's folder, as MindSpore Serving does (not from the current directory)."""
    script_dir = os.path.dirname(os.path.realpath(sys.argv[0])) if sys.argv and sys.argv[0] else os.getcwd()
    return os.path.realpath(os.path.join(script_dir, os.fspath(directory)))


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RuntimeError(f"Parameter '{name}' should be str, but actually {type(value)}")
    if not value:
        raise RuntimeError(f"Parameter '{name}' should not be empty str")


def _check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, item: bool = False) -> None:
    prefix = f"The item value '{value}' in parameter '{name}'" if item else f"Parameter '{name}'"
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"{prefix} should be int, but actually {type(value)}")
    if minimum is not None and value < minimum:
        raise RuntimeError(f"{prefix} should be in range [{minimum},{maximum}]" if maximum is not None else f"{prefix} should be >= {minimum}")
    if maximum is not None and value > maximum:
        raise RuntimeError(f"{prefix} should be in range [{minimum},{maximum}]" if minimum is not None else f"{prefix} should be <= {maximum}")


def _int_tuple(name: str, values: Any, minimum: int | None = None) -> tuple[int, ...]:
    """An int, or a list/tuple of distinct ints, as a tuple (MindSpore's check)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (tuple, list)):
        raise RuntimeError(f"Parameter '{name}' should be int or tuple/list of int, but actually {type(values)}")
    seen: list[int] = []
    for value in values:
        if value in seen:
            raise RuntimeError(f"The item value '{value}' in parameter '{name}' should not be repeated")
        _check_int(name, value, minimum, item=True)
        seen.append(value)
    return tuple(seen)


@dataclass
class SSLConfig:
    """TLS for the RESTful and gRPC servers: one-way, or mutual with ``verify_client=True``."""

    certificate: str
    private_key: str
    custom_ca: str | None = None
    verify_client: bool = False


@dataclass
class _Loaded:
    """How a configured servable was loaded, so hot reload can load more versions."""

    config: ServableStartConfig
    servable: Servable
    devices: list[Any]


@dataclass
class _State:
    registry: ServableRegistry = field(default_factory=ServableRegistry)
    transports: list[Any] = field(default_factory=list)
    handlers: list[Dataplane] = field(default_factory=list)  # REST's PredictHandlers and gRPC's dataplanes
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Batch hooks: an object with ``bind(servable, version) -> BatchObserver`` gets one
    # observer per loaded version; a plain BatchObserver is shared by all.
    observer: Any = field(default_factory=metrics.MetricsObserver)
    configured: dict[str, _Loaded] = field(default_factory=dict)  # servable name -> how it loaded
    loading: int = 0  # start_servables calls in progress
    stopping: bool = False
    epochs: RequestEpochs = field(default_factory=RequestEpochs)  # requests in flight, for retiring versions
    watcher: VersionWatcher | None = None
    observers: dict[int, Any] = field(default_factory=dict)  # id(LoadedVersion) -> its VersionObserver
    ready_listeners: list[Callable[[], None]] = field(default_factory=list)  # told when readiness may have changed
    processes: str | None = None  # "devices" or "single"; None: MSERVE_PROCESSES, else "devices"
    devices: Any = None  # the DeviceSupervisor (devices mode)
    frontends: list[Any] = field(default_factory=list)  # front-end WorkerPools (devices mode)
    run_dir: str | None = None  # sockets, manifest and metrics of this server's processes
    # How hot reload retires a version (a device process first lets its front-ends switch).
    retire: Any = None  # (name, version) -> None; None: _retire_version
    follower: Any = None  # devices mode: keeps the registry following the device processes
    # Distributed servables (mserve.distributed): () -> (ready, why), asked before anything else.
    readiness_probes: list[Callable[[], tuple[bool, str]]] = field(default_factory=list)
    stop_hooks: list[Callable[[], None]] = field(default_factory=list)  # run once by stop(), after the drain

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): ready once every configured servable serves a warm version."""
        if self.stopping:
            return False, "stopping"
        for probe in list(self.readiness_probes):  # a distributed group names the host it waits for
            ok, why = probe()
            if not ok:
                return False, why
        if self.loading:
            return False, "loading servables"
        if self.processes_started():  # devices mode: this process supervises, front-ends serve
            if self.devices is None:
                return False, "no servable loaded"
            down = self.devices.down()
            if down:
                return False, f"device process {', '.join(down)} is restarting"
            return True, "ready"
        if not self.configured:
            return False, "no servable loaded"
        served = self.registry.servables()
        missing = [name for name in self.configured if name not in served]
        if missing:
            return False, f"no version of servable {', '.join(missing)} is loaded"
        return True, "ready"

    def processes_started(self) -> bool:
        return self.devices is not None or bool(self.frontends)

    def failed_versions(self, name: str) -> list[dict[str, Any]]:
        """Versions hot reload could not load (they are skipped until they change)."""
        watcher = self.watcher
        if watcher is None:
            return []
        failures = list(watcher.failures.get(name, {}).values())
        return [{"version": f.version, "error": f.error} for f in sorted(failures, key=lambda f: f.version)]


_state = _State()


def registry() -> ServableRegistry:
    """The servables this process serves (for tools and tests)."""
    return _state.registry


def readiness() -> tuple[bool, str]:
    """(ready, reason): what ``GET /ready`` answers (200 when ready, else 503)."""
    return _state.readiness()


def add_readiness_probe(probe: Callable[[], tuple[bool, str]]) -> None:
    """Make ``/ready`` also ask ``probe()`` -> (ready, why); for parts of a servable
    that live outside this process (the hosts of a distributed servable)."""
    _state.readiness_probes.append(probe)


def remove_readiness_probe(probe: Callable[[], tuple[bool, str]]) -> None:
    if probe in _state.readiness_probes:
        _state.readiness_probes.remove(probe)


def on_stop(hook: Callable[[], None]) -> None:
    """Run ``hook()`` once when `stop` has drained the requests (a distributed
    group stops its hosts' processes)."""
    _state.stop_hooks.append(hook)


PROCESS_MODES = ("devices", "single")


def use_processes(mode: str) -> None:
    """``"devices"``: models in device processes, HTTP in front-end processes (the
    default); ``"single"``: everything in this process. Call before `start_servables`."""
    if mode not in PROCESS_MODES:
        raise ValueError(f"processes must be one of {', '.join(PROCESS_MODES)}, got {mode!r}")
    _state.processes = mode


def processes() -> str:
    """The process mode `start_servables` and `start_restful_server` use now."""
    if _state.processes is not None:
        return _state.processes
    mode = os.environ.get("MSERVE_PROCESSES", "devices").strip().lower() or "devices"
    if mode not in PROCESS_MODES:
        raise RuntimeError(f"MSERVE_PROCESSES must be one of {', '.join(PROCESS_MODES)}, got {mode!r}")
    return mode


MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Front-end processes when none is asked for: ``MSERVE_WORKERS``, else one per
    CPU core this process may use, at most 8 (past that, HTTP is rarely the limit
    and each front-end costs memory)."""
    raw = os.environ.get("MSERVE_WORKERS")
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise RuntimeError(f"MSERVE_WORKERS must be a whole number, got {raw!r}") from None
        if value < 1:
            raise RuntimeError(f"MSERVE_WORKERS must be at least 1, got {value}")
        return value
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def _run_dir() -> str:
    if _state.run_dir is None:
        _state.run_dir = tempfile.mkdtemp(prefix="mserve-")
    return _state.run_dir


def _child_env() -> dict[str, str]:
    """The environment of device and front-end processes: one metrics directory
    for the whole server (any front-end's /metrics sums every process)."""
    env = dict(os.environ)
    if not metrics.multiprocess_dir():
        folder = os.path.join(_run_dir(), "metrics")
        os.makedirs(folder, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = folder
    return env


def _refresh_ready() -> None:
    metrics.READY.set(1 if _state.readiness()[0] else 0)
    for listener in list(_state.ready_listeners):  # the gRPC health services
        listener()


def resolve_devices(device_type: str | None, device_ids: Sequence[int]) -> list[Any]:
    """Devices (type, id) for the backends; the type must be one that an installed
    backend runs on (else the error names what to install). ``None`` lets each
    model's backend pick its default type; ids are checked by the backend at load."""
    from .backends import BackendError, Device, check_device_type

    validate_device_type(device_type)  # MindSpore's types and text first
    try:
        kind = check_device_type(device_type)
    except BackendError as exc:
        raise ServableLoadError(str(exc)) from None
    return [Device(kind, i) for i in device_ids]


def start_servables(
    servable_configs: ServableStartConfig | Sequence[ServableStartConfig],
    enable_lite: bool = False,
    poll_interval: float | None = None,
) -> None:
    """Load and warm up the servables; raises `ServableLoadError` on any problem.

    ``servable_configs``: one `ServableStartConfig` or a list/tuple of them. Several
    configs of one servable are merged as MindSpore Serving merges them: their
    versions and device ids are united (they must agree on the directory, the
    device type, the decryption and mserve's batching settings).
    ``enable_lite`` (MindSpore's choice of its Lite inference package) is checked
    and has no effect: mserve's backends are chosen by each model's format.
    ``poll_interval`` (seconds, mserve addition): watch the servables' version
    folders and hot-reload versions that appear or disappear (see `mserve.serving.reload`);
    ``None`` (the default) or 0 leaves them alone.
    """
    if isinstance(servable_configs, ServableStartConfig):
        servable_configs = [servable_configs]
    if not isinstance(servable_configs, (tuple, list)):
        raise RuntimeError(
            f"Parameter 'servable_configs' should be ServableStartConfig, list or tuple of ServableStartConfig, but "
            f"actually {type(servable_configs)}"
        )
    if not isinstance(enable_lite, bool):
        raise RuntimeError(f"Parameter 'enable_lite' should be bool, but actually {type(enable_lite)}")
    for config in servable_configs:
        if not isinstance(config, ServableStartConfig):
            raise RuntimeError(
                f"The item of parameter 'servable_configs' should be ServableStartConfig, but actually {type(config)}"
            )
        config.check()
    configs = merge_configs(servable_configs)
    if poll_interval is not None and poll_interval < 0:
        raise ValueError(f"poll_interval must be >= 0, got {poll_interval}")
    if processes() == "devices":
        _start_devices(configs, poll_interval)
        return
    # "Loading" from the first moment: importing JAX alone takes seconds, and a server
    # already listening must answer 503 (not 404) meanwhile.
    with _state.lock:
        _state.loading += 1
    try:
        enable_compile_cache()
        from .backends.jax_runtime import prefer_sync_cpu_dispatch

        prefer_sync_cpu_dispatch()  # before anything makes JAX's CPU client
    except BaseException:
        with _state.lock:
            _state.loading -= 1
        raise
    with _state.lock:
        _refresh_ready()
        try:
            for config in configs:
                _load(config)
            if poll_interval:
                _watch([_state.configured[c.servable_name] for c in configs], poll_interval)
        finally:
            _state.loading -= 1
            _refresh_ready()


def _start_devices(configs: list[ServableStartConfig], poll_interval: float | None) -> None:
    """Devices mode: a device process per device loads the servables; front-ends
    already started pick them up from the manifest."""
    from .devices.supervisor import DeviceSupervisor

    with _state.lock:
        if _state.devices is not None:
            raise RuntimeError(
                "start_servables was already called: with device processes, pass every servable in one call "
                "(or call stop() first)"
            )
        supervisor = DeviceSupervisor(
            configs, _run_dir(), log_level=logging.getLogger("mserve").getEffectiveLevel(),
            poll_interval=poll_interval or None, env=_child_env(),
        )
        _state.loading += 1
        try:
            supervisor.start()
            _state.devices = supervisor
            _follow_devices(supervisor)
            for pool in _state.frontends:  # ready once every front-end serves them
                pool.wait_loaded()
        finally:
            _state.loading -= 1


def _follow_devices(supervisor: Any) -> None:
    """This process's registry mirrors what the device processes serve (as each
    front-end's does), so `registry`, the health port's ``/ready`` and tools see the
    servables, and Model calls from here would reach the device processes too."""
    from .devices.frontend import FrontendModels
    from .devices.manifest import Follower

    follower = Follower(supervisor.manifest_path, FrontendModels(_state, "supervisor", copies=False).apply, interval=0.5)
    follower.poll()
    follower.start()
    _state.follower = follower


_MERGED_ALIKE = ("device_type", "dec_key", "dec_mode", "max_batch_size", "batch_sizes", "max_batch_delay_ms", "batching")


def _alike(key: str, value: Any) -> Any:
    return (value or "none").lower() if key == "device_type" else value


def merge_configs(configs: Sequence[ServableStartConfig]) -> list[ServableStartConfig]:
    """One config per servable: configs of the same servable (the same version or
    not) unite their versions and device ids, and take the most parallel workers,
    as MindSpore Serving's ``merge_config`` does."""
    merged: dict[str, ServableStartConfig] = {}
    for config in configs:
        name = config.servable_name
        first = merged.get(name)
        if first is None:
            merged[name] = dataclasses.replace(config)
            continue
        if Path(first.servable_directory) != Path(config.servable_directory):
            raise RuntimeError(
                f"The servable directory of servable name {name} is different in multiple configurations, servable "
                f"directory: {config.servable_directory} and {first.servable_directory}"
            )
        if (first.dec_key, first.dec_mode) != (config.dec_key, config.dec_mode):
            raise RuntimeError(f"The dec key or dec mode of servable name {name} is different in multiple configurations.")
        for key in _MERGED_ALIKE:
            if _alike(key, getattr(first, key)) != _alike(key, getattr(config, key)):
                raise RuntimeError(
                    f"The {key} of servable name {name} is different in multiple configurations: "
                    f"{getattr(first, key)!r} and {getattr(config, key)!r}"
                )
        versions = list(dict.fromkeys(first.versions() + config.versions()))
        first.version_number = versions[0] if len(versions) == 1 else versions
        devices = [] if first.device_ids is None and config.device_ids is None else (
            list(dict.fromkeys(first.device_list() + config.device_list()))
        )
        first.device_ids = tuple(devices) if devices else None
        first.num_parallel_workers = max(first.num_parallel_workers, config.num_parallel_workers)
    return list(merged.values())


def _load(config: ServableStartConfig) -> None:
    root = Path(config.servable_directory)
    definition = load_definition(root, config.servable_name)
    present = list_versions(root / config.servable_name)
    if not present:
        raise ServableLoadError(
            f"servable '{config.servable_name}': no version folder (1/, 2/, ...) in {root / config.servable_name}"
        )
    wanted = []
    for number in config.versions():
        if number == 0:
            wanted.append(present[-1])
        elif number in present:
            wanted.append(number)
        else:
            raise ServableLoadError(
                f"servable '{config.servable_name}': version {number} not found in {root / config.servable_name} "
                f"(present: {', '.join(map(str, present))})"
            )
    devices = resolve_devices(config.device_type, config.device_list())
    servable = Servable(config.servable_name, root, definition)
    entry = _Loaded(config, servable, devices)
    for number in dict.fromkeys(wanted):
        loaded = _load_version(entry, number)
        _state.registry.add(servable, loaded)
        log.info("loaded servable %s version %d", config.servable_name, number)
    _state.configured[config.servable_name] = entry


def _load_version(entry: _Loaded, number: int) -> LoadedVersion:
    """One version folder, loaded and warm, with its metrics hooks attached."""
    config, name = entry.config, entry.config.servable_name
    bind = getattr(_state.observer, "bind", None)
    observer = bind(name, number) if bind is not None else _state.observer
    batching = BatchSettings(
        config.max_batch_size, config.batch_sizes, config.max_batch_delay_ms, config.batching, observer
    )
    try:
        loaded = load_version(
            entry.servable.directory, entry.servable.definition, number, entry.devices, batching,
            config.num_parallel_workers, config.dec_key, config.dec_mode,
        )
    except BaseException:
        metrics.VERSION_LOADS.labels(name, "failed").inc()
        raise
    metrics.VERSION_LOADS.labels(name, "ok").inc()
    if isinstance(observer, metrics.VersionObserver):
        observer.attach(loaded)
        _state.observers[id(loaded)] = observer
    return loaded


def _close_version(loaded: LoadedVersion) -> None:
    loaded.close()
    observer = _state.observers.pop(id(loaded), None)
    if observer is not None:
        observer.detach()


def _retire_version(name: str, version: int, timeout: float | None = None) -> None:
    """Stop routing to a version, let the requests that may use it finish, close it."""
    loaded = _state.registry.remove(name, version)
    if loaded is None:
        return
    if timeout is None:
        timeout = max((h.request_timeout for h in list(_state.handlers)), default=100.0) + 5.0
    if not _state.epochs.wait_for_earlier(timeout):
        log.warning("servable %s version %d: requests still running after %gs; closing it anyway", name, version, timeout)
    _close_version(loaded)
    log.info("unloaded servable %s version %d", name, version)


def _watch(entries: list[_Loaded], poll_interval: float) -> None:
    """Start (or widen) hot reload for these servables."""
    targets = {}
    if _state.watcher is not None:
        _state.watcher.stop()
        targets = dict(_state.watcher.targets)
    for entry in entries:
        numbers = entry.config.versions()
        targets[entry.config.servable_name] = WatchTarget(
            entry.config.servable_name,
            Path(entry.servable.directory) / entry.config.servable_name,
            pinned={n for n in numbers if n},
            newest=0 in numbers,
        )

    def load(name: str, version: int) -> LoadedVersion:
        return _load_version(_state.configured[name], version)

    def add(name: str, loaded: LoadedVersion) -> None:
        _state.registry.add(_state.configured[name].servable, loaded)

    def retire(name: str, version: int) -> None:
        (_state.retire or _retire_version)(name, version)

    _state.watcher = VersionWatcher(
        list(targets.values()), _state.registry, load, add, retire, poll_interval, _refresh_ready
    )
    _state.watcher.start()
    log.info("hot reload: watching %s every %gs", ", ".join(sorted(targets)), poll_interval)


class RestfulServer:
    """A started RESTful endpoint (returned by `start_restful_server`)."""

    def __init__(self, transport: Any, host: str):
        self.transport = transport
        self.host = host

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.scheme}://{host}:{self.port}"


def start_restful_server(
    address: str = "127.0.0.1:5500",
    max_msg_mb_size: int = 100,
    ssl_config: SSLConfig | None = None,
    threads: int = 16,
    max_enqueued_requests: int = 10000,
    request_timeout: float = 100.0,
    sock: socket.socket | None = None,
    balance: ConnectionBalance | None = None,
    inline_max_ms: float = 1.0,
    max_instances_per_request: int = DEFAULT_MAX_INSTANCES,
    max_connections: int | None = None,
    idle_timeout: float = 60.0,
    header_timeout: float = 30.0,
    handshake_timeout: float = 10.0,
    max_header_kb: int = 64,
    workers: int | None = None,
) -> RestfulServer:
    """Serve the loaded servables over HTTP (HTTPS with ``ssl_config``) at ``address``
    (``host:port``; port 0 picks a free one, see the returned server's ``port``).

    mserve additions: ``threads`` (HTTP worker threads; requests waiting on a batch
    hold one each), ``max_enqueued_requests`` (more at once get 503), and
    ``request_timeout`` in seconds (late instances get ``Time out``), and ``sock``, an
    already listening socket to serve instead of binding ``address`` (worker
    processes share one this way, evened out by ``balance``; plain HTTP only), and
    ``inline_max_ms``: predicts of methods that take at most this long (and do not
    batch across requests) run on the HTTP I/O thread, saving two thread hand-offs
    each (see `mserve.transport.inline`; 0 turns it off).

    Limits on what clients may hold (README, "Limits and hostile clients"):
    ``max_instances_per_request`` (413 beyond), ``max_connections`` (the longest-idle
    connections are closed to make room; None: 10,000 or what the descriptor limit
    allows), ``idle_timeout``, ``header_timeout``, ``handshake_timeout`` (seconds),
    ``max_header_kb`` (request line and headers; 431 beyond).

    ``workers``: front-end processes serving the port in devices mode (the default,
    see the module docstring); ``None`` is `default_workers`. Each front-end applies
    these limits to its own connections.

    From here on the process keeps serving after the calling script ends, until
    `stop` or SIGINT/SIGTERM (see `mserve.lifetime`).
    """
    if not isinstance(max_msg_mb_size, int) or not 1 <= max_msg_mb_size <= 512:
        raise RuntimeError(f"max_msg_mb_size must be an integer from 1 to 512, got {max_msg_mb_size!r}")
    if inline_max_ms < 0:
        raise RuntimeError(f"inline_max_ms must be >= 0, got {inline_max_ms!r}")
    if sock is None and processes() == "devices":
        restful = {
            "max_msg_mb_size": max_msg_mb_size, "threads": threads, "max_enqueued_requests": max_enqueued_requests,
            "request_timeout": request_timeout, "inline_max_ms": inline_max_ms,
            "max_instances_per_request": max_instances_per_request, "max_connections": max_connections,
            "idle_timeout": idle_timeout, "header_timeout": header_timeout, "handshake_timeout": handshake_timeout,
            "max_header_kb": max_header_kb,
        }
        return _start_frontends(address, ssl_config, restful, workers)
    if workers is not None and workers != 1:
        raise RuntimeError(f"workers={workers} needs device processes (processes mode 'devices'), not 'single'")
    host, port = parse_address(address)
    max_body = max_msg_mb_size * 1024 * 1024
    if not isinstance(max_instances_per_request, int) or max_instances_per_request < 1:
        raise RuntimeError(f"max_instances_per_request must be an integer >= 1, got {max_instances_per_request!r}")
    limits = ConnectionLimits(max_connections, idle_timeout, header_timeout, handshake_timeout, max_header_kb * 1024)
    limits.check()
    handler = PredictHandler(
        _state.registry, max_enqueued_requests, request_timeout, loading=lambda: _state.loading > 0,
        max_instances=max_instances_per_request,
    )
    inline = InlinePolicy(inline_max_ms / 1000, handler.inline_eligible) if inline_max_ms else None
    limit_arenas()  # before the transport's threads start (see mserve.transport.memory)
    app = create_app(handler, max_body, _state, inline)
    if ssl_config is not None:
        from .transport.https import build_ssl_context

        build_ssl_context(ssl_config)  # bad certificate files fail here, before the port is taken
    with _state.lock:
        if sock is None:
            sock = bind_socket(host, port)
        try:
            if ssl_config is not None:
                from .transport.https import TlsTransport

                transport: Any = TlsTransport(
                    app, sock, ssl_config, threads=threads, max_body_bytes=max_body, balance=balance, inline=inline,
                    limits=limits, shed=handler.should_shed,
                )
            else:
                transport = WaitressTransport(
                    app, sock, threads=threads, max_body_bytes=max_body, balance=balance, inline=inline,
                    limits=limits, shed=handler.should_shed,
                )
            transport.start()
        except BaseException:
            sock.close()
            raise
        _state.handlers.append(handler)
        _state.transports.append(transport)
        lifetime.keep_serving(stop)
    server = RestfulServer(transport, host)
    log.info("RESTful server listening on %s", server.url)
    return server


def start_grpc_server(
    address: str,
    max_msg_mb_size: int = 100,
    ssl_config: SSLConfig | None = None,
    threads: int = 16,
    max_enqueued_requests: int = 10000,
    request_timeout: float = 100.0,
    reuse_port: bool = False,
    max_instances_per_request: int = DEFAULT_MAX_INSTANCES,
    workers: int | None = None,
) -> Any:
    """Serve the loaded servables over gRPC (MindSpore Serving's ``MSService``, and
    the ``grpc.health.v1`` health service) at ``address``: ``{ip}:{port}`` or
    ``unix:{path}`` (relative or absolute; its directory must exist).
    ``max_msg_mb_size`` (1..512) limits request and reply messages; ``ssl_config``
    serves TLS, mutual with ``verify_client=True``. Raises ``RuntimeError("Serving
    Error: ...")`` when it cannot start (bad address, port in use, bad key).

    mserve additions: port 0 picks a free port (``.port``/``.target`` on the returned
    server), ``threads`` (calls served at once), ``max_enqueued_requests``,
    ``request_timeout`` and ``max_instances_per_request`` as for
    `start_restful_server`, and ``reuse_port`` (worker processes sharing one port).

    In devices mode (the default, see the module docstring) a ``host:port`` address
    is served by ``workers`` front-end processes of its own (``None``:
    `default_workers`), each binding the port with SO_REUSEPORT so the kernel spreads
    gRPC connections over them; they decode, run the Python stages and send model
    calls to the device processes, as REST's front-ends do, and each one's health
    service says SERVING once it serves the servables. A ``unix:`` address is served
    by this process (its registry follows the device processes). Either may be
    started before or after `start_restful_server` and `start_servables`.
    """
    from .transport.grpc import GrpcTransport

    if isinstance(max_msg_mb_size, bool) or not isinstance(max_msg_mb_size, int):
        raise RuntimeError(f"Parameter 'max_msg_mb_size' should be int, but actually {type(max_msg_mb_size)}")
    if not 1 <= max_msg_mb_size <= 512:
        raise RuntimeError("Parameter 'max_msg_mb_size' should be in range [1,512]")
    if ssl_config is not None and not isinstance(ssl_config, SSLConfig):
        raise RuntimeError("The type of ssl_config should be type of SSLConfig")
    if not isinstance(max_instances_per_request, int) or max_instances_per_request < 1:
        raise RuntimeError(f"max_instances_per_request must be an integer >= 1, got {max_instances_per_request!r}")
    unix = isinstance(address, str) and address.startswith("unix:")
    if processes() == "devices" and not unix:
        grpc = {
            "max_msg_mb_size": max_msg_mb_size, "threads": threads, "max_enqueued_requests": max_enqueued_requests,
            "request_timeout": request_timeout, "max_instances_per_request": max_instances_per_request,
        }
        return _start_grpc_frontends(address, ssl_config, grpc, reuse_port, workers)
    if workers is not None and workers != 1:
        raise RuntimeError(
            f"workers={workers} needs device processes (processes mode 'devices') and a host:port address"
        )
    dataplane = Dataplane(
        _state.registry, max_enqueued_requests, request_timeout, loading=lambda: _state.loading > 0,
        max_instances=max_instances_per_request,
    )
    with _state.lock:
        transport = GrpcTransport(
            dataplane, address, _state.readiness, _state.epochs, max_msg_mb_size, ssl_config, threads, reuse_port
        )
        transport.start()
        _state.handlers.append(dataplane)
        _state.transports.append(transport)
        _state.ready_listeners.append(transport.refresh_health)
        lifetime.keep_serving(stop)
    return transport


class _Frontends:
    """The front-end processes of one RESTful server, as `RestfulServer` sees them."""

    def __init__(self, pool: Any, scheme: str):
        self.pool = pool
        self.scheme = scheme
        self.port = pool.sock.getsockname()[1]

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.pool.stop(drain_timeout)


def _start_frontends(
    address: str, ssl_config: SSLConfig | None, restful: dict[str, Any], workers: int | None
) -> RestfulServer:
    """Devices mode: bind ``address`` here, serve it from ``workers`` front-end processes."""
    from .transport.workers import WorkerPool
    from .devices.manifest import FILE_NAME

    count = default_workers() if workers is None else workers
    if not isinstance(count, int) or count < 1:
        raise RuntimeError(f"workers must be a whole number >= 1, got {workers!r}")
    host, port = parse_address(address)
    if ssl_config is not None:
        from .transport.https import build_ssl_context

        build_ssl_context(ssl_config)  # bad certificate files fail here, before the port is taken
    with _state.lock:
        sock = bind_socket(host, port)
        pool = WorkerPool(
            [], sock, count, restful=restful, ssl_config=ssl_config,
            log_level=logging.getLogger("mserve").getEffectiveLevel(),
            manifest=os.path.join(_run_dir(), FILE_NAME), env=_child_env(),
            access_log=logging.getLogger("mserve.access").isEnabledFor(logging.INFO),
        )
        pool.start(loaded=_state.devices is not None)
        frontends = _Frontends(pool, "https" if ssl_config is not None else "http")
        _state.frontends.append(pool)
        _state.transports.append(frontends)
        lifetime.keep_serving(stop)
    server = RestfulServer(frontends, host)
    log.info("RESTful server listening on %s (%d front-end processes)", server.url, count)
    return server


class _GrpcFrontends:
    """The front-end processes serving one gRPC address (devices mode), as the caller
    of `start_grpc_server` sees them: ``target``, ``port``, ``stop``."""

    scheme = "grpc"

    def __init__(self, pool: Any, holder: socket.socket, target: str):
        self.pool = pool
        self.holder = holder  # keeps the port ours while front-ends come and go
        self.target = target
        self.port = int(target.rpartition(":")[2])

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.pool.stop(drain_timeout)
        self.holder.close()


def _start_grpc_frontends(
    address: str, ssl_config: SSLConfig | None, grpc: dict[str, Any], reuse_port: bool, workers: int | None
) -> _GrpcFrontends:
    """Devices mode: ``workers`` front-end processes serving gRPC only, each binding
    ``address`` with SO_REUSEPORT; this process holds the port (checked free) meanwhile."""
    from .transport.grpc import reserve_port, server_credentials
    from .transport.workers import WorkerPool
    from .devices.manifest import FILE_NAME

    count = default_workers() if workers is None else workers
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise RuntimeError(f"workers must be a whole number >= 1, got {workers!r}")
    if ssl_config is not None:
        server_credentials(ssl_config)  # bad certificate files fail here, before any process starts
    with _state.lock:
        holder, target = reserve_port(address, shared=reuse_port)
        try:
            pool = WorkerPool(
                [], None, count, ssl_config=ssl_config, log_level=logging.getLogger("mserve").getEffectiveLevel(),
                manifest=os.path.join(_run_dir(), FILE_NAME), env=_child_env(),
                access_log=logging.getLogger("mserve.access").isEnabledFor(logging.INFO),
                grpc={**grpc, "address": target, "reuse_port": True},
            )
            pool.start(loaded=_state.devices is not None)
        except BaseException:
            holder.close()
            raise
        frontends = _GrpcFrontends(pool, holder, target)
        _state.frontends.append(pool)
        _state.transports.append(frontends)
        lifetime.keep_serving(stop)
    log.info("Serving gRPC server listening on %s (%d front-end processes)", target, count)
    return frontends


def start_health_server(address: str = "127.0.0.1:5501", threads: int = 2) -> RestfulServer:
    """Serve ``GET /health`` and ``GET /ready`` alone over plain HTTP at ``address``
    (mserve addition): probes that need no client certificate when the RESTful server
    requires one (mutual TLS), and nothing else (no predicts, no metadata). Bind it to
    127.0.0.1 unless the probes come from outside (a kubelet's ``httpGet``). Stopped by
    `stop` with the rest; call it before `start_servables` to answer while loading."""
    from .ops.endpoints import create_probe_app

    host, port = parse_address(address)
    with _state.lock:
        sock = bind_socket(host, port)
        try:
            transport = WaitressTransport(create_probe_app(_state), sock, threads=threads, max_body_bytes=1 << 16)
            transport.start()
        except BaseException:
            sock.close()
            raise
        _state.transports.append(transport)
    probes = RestfulServer(transport, host)
    log.info("health and readiness (plain HTTP, no client certificate) on %s/health and /ready", probes.url)
    return probes


def begin_shutdown() -> None:
    """Answer ``/ready`` with 503 from now on and stop hot reload; requests are
    still served. `stop` does this first; call it earlier (say, on a signal) to give
    load balancers a head start."""
    _state.stopping = True
    _refresh_ready()
    for pool in _state.frontends:  # devices mode: the front-ends answer /ready
        pool.begin_shutdown()
    watcher = _state.watcher
    if watcher is not None:
        watcher.stop()


def stop(drain_timeout: float = 30.0, grace: float = 0.0) -> None:
    """Stop gracefully and unload: ``/ready`` answers 503 at once; new requests are
    still served for ``grace`` seconds; then the listeners close, new predicts get
    503, and in-flight requests finish (up to ``drain_timeout`` seconds)."""
    begin_shutdown()
    if grace > 0:
        time.sleep(grace)
    with _state.lock:
        transports, _state.transports = _state.transports, []
        handlers, _state.handlers = _state.handlers, []
        for handler in handlers:
            handler.draining = True
        for transport in transports:
            transport.stop(drain_timeout)
        _state.ready_listeners.clear()
        _state.frontends.clear()
        # Device processes after the front-ends: their calls in flight are done by now.
        if _state.follower is not None:
            _state.follower.stop()
            _state.follower = None
        if _state.devices is not None:
            _state.devices.stop(drain_timeout)
            _state.devices = None
        if _state.run_dir is not None:
            shutil.rmtree(_state.run_dir, ignore_errors=True)
            _state.run_dir = None
        _state.watcher = None
        _state.registry.clear()
        hooks, _state.stop_hooks = _state.stop_hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # one failing hook must not keep the others from running
                log.exception("a stop hook failed")
        for observer in _state.observers.values():
            observer.detach()
        _state.observers.clear()
        _state.configured.clear()
        _state.processes = None  # use_processes holds for one server's lifetime
        _state.stopping = False
        _refresh_ready()
    lifetime.release()
