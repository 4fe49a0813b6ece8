"""Loading servables into a runtime: the configured servables' version folders,
loaded and warm, with their metrics hooks (`start_servables`); a version unloaded
once the requests that may use it are done (`retire_version`); hot reload
(`watch`, over `mserve.serving.reload`).

The functions take the `mserve.runtime.runtime.Runtime` they act on as their first
argument; the `Runtime` class makes them its methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import logsetup
from ..errors import ServableLoadError
from ..ops import metrics
from ..serving.compile_cache import enable_compile_cache
from ..serving.reload import VersionWatcher, WatchTarget
from ..serving.servable import (
    BatchSettings, LoadedVersion, Servable, choose_versions, load_definition, load_version,
)
from .config import ServableStartConfig, merge_configs, validate_device_type

log = logging.getLogger("mserve.server")


@dataclass
class LoadedServable:
    """How a configured servable was loaded, so hot reload can load more versions."""

    config: ServableStartConfig
    servable: Servable
    devices: list[Any]


def resolve_devices(device_type: str | None, device_ids: Sequence[int]) -> list[Any]:
    """Devices (type, id) for the backends; the type must be one that an installed
    backend runs on (else the error names what to install). ``None`` lets each
    model's backend pick its default type; ids are checked by the backend at load."""
    from ..backends import BackendError, Device, check_device_type

    validate_device_type(device_type)  # MindSpore's types and text first
    try:
        kind = check_device_type(device_type)
    except BackendError as exc:
        raise ServableLoadError(str(exc)) from None
    return [Device(kind, i) for i in device_ids]


def check_device_target(config: ServableStartConfig, definition: Any) -> None:
    """MindSpore Serving's checks, with its texts, that the declared models can run
    where the config puts them: ``device_ids=None`` (no device type) needs the CPU,
    and a named ``device_type`` needs a backend for every model's format on it.
    mserve's reason (what is installed, what to install) follows in parentheses."""
    from ..backends import BackendError, find_backend

    named = config.device_type is not None and config.device_type.lower() != "none"
    if not definition.models or (config.device_ids is not None and not named):
        return
    kind = config.target_device_type()
    for model in definition.models:
        try:
            find_backend(model.model_format, kind)
        except BackendError as exc:
            name = config.servable_name
            if not named:
                raise ServableLoadError(
                    f"Servable '{name}' has models declared by declare_model, but parameter 'device_ids' of "
                    f"ServableStartConfig is not set in Serving startup script when the MindSpore or Lite inference "
                    f"package not support CPU ({exc})") from None
            raise ServableLoadError(
                f"The device type '{config.device_type.lower()}' of servable name {name} is inconsistent with current "
                f"running environment, supported device type: {_supported_types(model.model_format)} ({exc})"
            ) from None


def _supported_types(model_format: str) -> str:
    """``None or 'gpu'``, ``None, 'ascend' or 'cpu'``: as MindSpore Serving lists them."""
    from ..backends import BackendError, find_backend

    found = []
    for kind in (None, "cpu"):
        try:
            found.append(find_backend(model_format, kind)[1])
        except BackendError:
            found.append(None)
    default, cpu = found
    if default is None:
        return "None"
    if cpu and cpu != default:
        return f"None, '{default}' or '{cpu}'"
    return f"None or '{default}'"


def start_servables(
    runtime: Any,
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
    logsetup.for_start_script()  # a start script logs where it listens and when it is ready
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
    if runtime.processes() == "devices":
        runtime.start_devices(configs, poll_interval)
        runtime.log_if_ready()
        return
    # "Loading" from the first moment: importing JAX alone takes seconds, and a server
    # already listening must answer 503 (not 404) meanwhile.
    with runtime.lock:
        runtime.loading += 1
    try:
        enable_compile_cache()
        from ..backends.jax_runtime import prefer_sync_cpu_dispatch

        prefer_sync_cpu_dispatch()  # before anything makes JAX's CPU client
    except BaseException:
        with runtime.lock:
            runtime.loading -= 1
        raise
    with runtime.lock:
        runtime.refresh_ready()
        try:
            for config in configs:
                load_servable(runtime, config)
            if poll_interval:
                watch(runtime, [runtime.configured[c.servable_name] for c in configs], poll_interval)
        finally:
            runtime.loading -= 1
            runtime.refresh_ready()
    runtime.log_if_ready()


def load_servable(runtime: Any, config: ServableStartConfig) -> None:
    """Load the versions ``config`` asks for into ``runtime``'s registry."""
    root = Path(config.servable_directory)
    definition = load_definition(root, config.servable_name)
    wanted = choose_versions(root, config.servable_name, bool(definition.models), config.versions())
    check_device_target(config, definition)
    devices = resolve_devices(config.target_device_type(), config.device_list())
    servable = Servable(config.servable_name, root, definition)
    entry = LoadedServable(config, servable, devices)
    for number in dict.fromkeys(wanted):
        loaded = load_version_of(runtime, entry, number)
        runtime.registry.add(servable, loaded)  # (it has logged "servable NAME version N ready")
    runtime.configured[config.servable_name] = entry


def load_version_of(runtime: Any, entry: LoadedServable, number: int) -> LoadedVersion:
    """One version folder, loaded and warm, with its metrics hooks attached."""
    config, name = entry.config, entry.config.servable_name
    bind = getattr(runtime.observer, "bind", None)
    observer = bind(name, number) if bind is not None else runtime.observer
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
        runtime.observers[id(loaded)] = observer
    return loaded


def close_version(runtime: Any, loaded: LoadedVersion) -> None:
    loaded.close()
    observer = runtime.observers.pop(id(loaded), None)
    if observer is not None:
        observer.detach()


def retire_version(runtime: Any, name: str, version: int, timeout: float | None = None) -> None:
    """Stop routing to a version, let the requests that may use it finish, close it."""
    loaded = runtime.registry.remove(name, version)
    if loaded is None:
        return
    if timeout is None:
        timeout = max((h.request_timeout for h in list(runtime.handlers)), default=100.0) + 5.0
    if not runtime.epochs.wait_for_earlier(timeout):
        log.warning("servable %s version %d: requests still running after %gs; closing it anyway", name, version, timeout)
    close_version(runtime, loaded)
    log.info("unloaded servable %s version %d", name, version)


def watch(runtime: Any, entries: list[LoadedServable], poll_interval: float) -> None:
    """Start (or widen) hot reload for these servables."""
    targets = {}
    if runtime.watcher is not None:
        runtime.watcher.stop()
        targets = dict(runtime.watcher.targets)
    for entry in entries:
        numbers = entry.config.versions()
        targets[entry.config.servable_name] = WatchTarget(
            entry.config.servable_name,
            Path(entry.servable.directory) / entry.config.servable_name,
            pinned={n for n in numbers if n},
            newest=0 in numbers,
        )

    def load(name: str, version: int) -> LoadedVersion:
        return load_version_of(runtime, runtime.configured[name], version)

    def add(name: str, loaded: LoadedVersion) -> None:
        runtime.registry.add(runtime.configured[name].servable, loaded)

    def retire(name: str, version: int) -> None:
        if runtime.retire is not None:
            runtime.retire(name, version)
        else:
            retire_version(runtime, name, version)

    runtime.watcher = VersionWatcher(
        list(targets.values()), runtime.registry, load, add, retire, poll_interval, runtime.refresh_ready
    )
    runtime.watcher.start()
    log.info("hot reload: watching %s every %gs", ", ".join(sorted(targets)), poll_interval)
