"""Starting, watching and stopping the device processes; the manifest they publish.

`plan_groups` assigns each servable to device processes: one process per device id
of a device type (``gpu:0``, ``gpu:1``, ``cpu:0``), holding every servable configured
on that device. A group is a tuple of ids so that a model spanning several devices
can live in one process (a sharded model: ``DeviceGroup("gpu", (0, 1))``; today every
group has one id).

Each device process sees only its devices and gets JAX's memory settings
(`device_env`): ``CUDA_VISIBLE_DEVICES`` narrowed to its GPUs and
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the environment already sets
``XLA_PYTHON_CLIENT_PREALLOCATE`` or ``XLA_PYTHON_CLIENT_MEM_FRACTION``.

`DeviceSupervisor` starts the processes (they load in parallel), writes the manifest
(`manifest.write`) once all serve, restarts a process that dies (the front-ends'
calls to it fail at once with 503 meanwhile) and rewrites the manifest when it is
back or when hot reload changed what it serves. `stop` sends SIGTERM: a device
process finishes its calls in flight and exits.

Watchdog: a serving device process writes ``ALIVE`` every `HEARTBEAT_SECONDS`; one
silent for ``hang_timeout`` seconds (``MSERVE_DEVICE_HANG_TIMEOUT``, default 10:
stopped by SIGSTOP, or hung with the interpreter locked) is logged, marked down in
the manifest, killed and restarted like one that died.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ServableLoadError
from ..lifetime import start_child, stop_processes
from ..ops.child_stderr import StderrRelay
from ..runtime.config import ServableStartConfig
from . import manifest

log = logging.getLogger("mserve.devices.supervisor")

HEARTBEAT_SECONDS = 1.0  # how often a serving device process says ALIVE
DEFAULT_HANG_TIMEOUT = 10.0  # silent this long: stopped or hung, restarted


@dataclass(frozen=True)
class DeviceGroup:
    """The devices one device process owns."""

    device_type: str | None
    ids: tuple[int, ...]

    @property
    def key(self) -> str:
        """``gpu:0``, ``cpu:1``, ``default:0`` (JAX's default kind), ``gpu:0+1``."""
        kind = (self.device_type or "default").lower()
        return f"{'gpu' if kind == 'cuda' else kind}:{'+'.join(map(str, self.ids))}"


def plan_groups(configs: Sequence[Any], spans: Any = None) -> dict[DeviceGroup, list[Any]]:
    """Device group -> the servable configs it loads (each narrowed to the group's
    ids). A servable with a model that spans its devices (a sharded model, see
    `spans_devices`) goes whole to one group of all its ids."""
    spans = spans or spans_devices
    groups: dict[DeviceGroup, list[Any]] = {}
    for config in configs:
        ids = list(dict.fromkeys(config.device_list()))
        together = [tuple(ids)] if len(ids) > 1 and spans(config) else [(i,) for i in ids]
        for members in together:
            kind = config.target_device_type()  # device_ids=None: the CPU, as MindSpore means it
            group = DeviceGroup(kind, members)
            groups.setdefault(group, []).append(dataclasses.replace(config, device_ids=list(members), device_type=kind))
    return groups


def spans_devices(config: Any) -> bool:
    """Whether a model of this servable is one instance over several devices (its
    backend shards it). Reads servable_config.py here; a servable that does not even
    load is left to its device process to report."""
    from ..backends import find_backend
    from ..serving.servable import load_definition

    try:
        definition = load_definition(config.servable_directory, config.servable_name)
        for model in definition.models:
            backend, _ = find_backend(model.model_format, config.device_type)
            if backend.shards is not None and backend.shards(model.options):
                return True
    except Exception:
        return False
    return False


def device_env(group: DeviceGroup, base: dict[str, str] | None = None) -> tuple[dict[str, str], bool]:
    """The environment of a device process, and whether CUDA device ids were
    narrowed (renumbered from 0) in it."""
    env = dict(os.environ if base is None else base)
    env["MSERVE_PROCESSES"] = "single"
    kind = (group.device_type or "").lower()
    remapped = False
    if kind in ("", "gpu", "cuda"):
        visible = env.get("CUDA_VISIBLE_DEVICES")
        listed = [v for v in visible.split(",") if v.strip()] if visible else None
        if listed is None or all(i < len(listed) for i in group.ids):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(listed[i] if listed else str(i) for i in group.ids)
            remapped = True
        if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env:
            env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    elif kind == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")  # never touch a GPU from a CPU device process
    return env, remapped


class _DeviceProcess:
    """One device process and what it last said it serves."""

    def __init__(self, group: DeviceGroup, configs: list[Any], socket_path: str):
        self.group = group
        self.configs = configs
        self.socket_path = socket_path
        self.proc: subprocess.Popen | None = None
        self.described: dict[str, Any] | None = None
        self.up = False
        self.restarts = 0
        self.heard = time.monotonic()  # its last report (``ALIVE`` or any other line)


class DeviceSupervisor:
    """The device processes of one server."""

    def __init__(
        self,
        configs: Sequence[Any],
        run_dir: str | os.PathLike,
        log_level: int = logging.INFO,
        poll_interval: float | None = None,
        ready_timeout: float = 600.0,
        env: dict[str, str] | None = None,
        hang_timeout: float | None = None,
        distributed: dict[str, Any] | None = None,
    ):
        self.env = env
        self.hang_timeout = hang_timeout if hang_timeout is not None else _hang_timeout_from_env()
        self.run_dir = Path(run_dir)
        self.manifest_path = self.run_dir / manifest.FILE_NAME
        self.log_level = log_level
        self.poll_interval = poll_interval
        self.ready_timeout = ready_timeout
        self.devices = [
            _DeviceProcess(group, group_configs, str(self.run_dir / f"device-{group.key.replace(':', '-')}.sock"))
            for group, group_configs in plan_groups(configs).items()
        ]
        self.configs = {c.servable_name: _config_json(c, keep_workers=True) for c in configs}
        # A distributed group (mserve.distributed): started by the device process of
        # the model that spans hosts, with its readiness written beside the manifest.
        self.distributed = distributed
        self.group_process: str | None = None
        if distributed is not None and self.devices:
            from ..distributed.placement import group_process

            self.group_process = group_process([(d.group.key, d.configs) for d in self.devices])
        self._generation = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._watcher: threading.Thread | None = None
        self.relays: list[StderrRelay] = []  # one per process started: its log lines, copied out

    # ------------------------------------------------------------------ start

    def _spawn(self, device: _DeviceProcess) -> None:
        env, remapped = device_env(device.group, self.env)
        settings = {
            "group": device.group.key,
            "socket": device.socket_path,
            "configs": [_config_json(c) for c in device.configs],
            "remapped": remapped,
            "log_level": self.log_level,
            "poll_interval": self.poll_interval,
        }
        if device.group.key == self.group_process:
            from ..distributed.status import status_path

            settings["distributed"] = self.distributed
            settings["distributed_status"] = str(status_path(self.run_dir))
        proc = start_child(
            [sys.executable, "-m", "mserve.runtime.device_role"], f"device-{device.group.key}",
            {signal.SIGTERM, signal.SIGINT}, self.relays,  # it waits for them (sigwait)
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            # Its own process group: Ctrl+C (SIGINT to the terminal's foreground group)
            # or a group-wide SIGTERM reaches the server, which stops the device
            # processes last, after the front-ends drained. Without it a device process
            # exited first and was "restarted" mid-stop. (die_with_parent covers a
            # server killed outright.)
            start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings))
        proc.stdin.close()
        device.proc = proc

    def _wait_ready(self, device: _DeviceProcess) -> None:
        proc = device.proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("PROGRESS "):
                _progress(line[9:])
                continue
            if line.startswith("READY "):
                device.heard = time.monotonic()
                device.described = json.loads(line[6:])
                threading.Thread(target=self._follow, args=(device, proc), daemon=True).start()
                return
            if line.startswith("FAILED "):
                proc.wait()
                raise ServableLoadError(line[7:].strip())
        code = proc.wait()
        if self._stopping:
            raise ServableLoadError("the server stopped while the device processes were loading")
        raise ServableLoadError(f"device process {device.group.key} exited with code {code} before serving")

    def _follow(self, device: _DeviceProcess, proc: subprocess.Popen) -> None:
        """Read what a serving device process reports (hot reload: ``SERVES``)."""
        assert proc.stdout is not None
        for line in proc.stdout:
            device.heard = time.monotonic()
            if line.startswith("SERVES ") and device.proc is proc:
                device.described = json.loads(line[7:])
                self.publish()

    def start(self) -> None:
        """Start every device process; returns once all serve and the manifest is
        written, or raises the first load error (after stopping the others)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            for device in self.devices:
                self._spawn(device)
            for device in self.devices:
                self._wait_ready(device)
                device.up = True
        except BaseException:
            self.stop(drain_timeout=2)
            raise
        self.publish()
        self._watcher = threading.Thread(target=self._watch, name="mserve-devices", daemon=True)
        self._watcher.start()

    def publish(self) -> None:
        """Write the manifest the front-ends follow."""
        with self._lock:
            self._generation += 1
            up = [d for d in self.devices if d.described is not None]
            manifest.write(
                self.manifest_path, self._generation, [d.described for d in up], self.configs,  # type: ignore[misc]
                down={d.group.key for d in up if not d.up},
            )

    # ------------------------------------------------------------------ faults

    def _watch(self) -> None:
        """Restart device processes that die; publish them again once they serve."""
        while not self._stopping:
            time.sleep(0.2)
            for device in self.devices:
                proc = device.proc
                if self._stopping or proc is None:
                    continue
                if proc.poll() is None:
                    self._check_alive(device, proc)
                    continue
                log.error(
                    "device process %s (pid %d) exited with code %s; starting a new one",
                    device.group.key, proc.pid, proc.returncode,
                )
                _forget_metrics(proc.pid)
                device.up = False
                self.publish()  # front-ends keep its versions: calls answer 503 until it is back
                try:
                    self._spawn(device)
                    self._wait_ready(device)
                    device.up = True
                    device.restarts += 1
                    log.info("device process %s serves again (pid %d)", device.group.key, device.proc.pid)  # type: ignore[union-attr]
                    self.publish()
                except Exception as exc:
                    log.error("restarting device process %s failed: %s; trying again", device.group.key, exc)
                    time.sleep(1.0)

    def _check_alive(self, device: _DeviceProcess, proc: subprocess.Popen) -> None:
        silent = time.monotonic() - device.heard
        if device.up and silent > self.hang_timeout:
            log.error(
                "device process %s (pid %d) has not reported for %.0fs (stopped or hung): marking it down and "
                "restarting it", device.group.key, proc.pid, silent,
            )
            device.up = False
            self.publish()
            proc.kill()  # the loop restarts it as one that died

    def down(self) -> list[str]:
        """Device groups whose process is restarting."""
        return [d.group.key for d in self.devices if not d.up]

    def describe(self) -> list[dict[str, Any]]:
        return [d.described for d in self.devices if d.described is not None]

    # ------------------------------------------------------------------ stop

    def stop(self, drain_timeout: float = 30.0) -> None:
        """SIGTERM every device process (each finishes its calls in flight), wait,
        kill what outlives the drain."""
        self._stopping = True
        stop_processes([d.proc for d in self.devices if d.proc is not None], drain_timeout)
        relays, self.relays = self.relays, []
        for relay in relays:  # the device processes' last lines (they have exited)
            relay.join()
        for device in self.devices:
            try:
                os.unlink(device.socket_path)
            except OSError:
                pass


def _hang_timeout_from_env() -> float:
    raw = os.environ.get("MSERVE_DEVICE_HANG_TIMEOUT", "")
    if not raw:
        return DEFAULT_HANG_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise RuntimeError(f"MSERVE_DEVICE_HANG_TIMEOUT must be seconds (a number), got {raw!r}") from None
    if value < 3 * HEARTBEAT_SECONDS:
        raise RuntimeError(f"MSERVE_DEVICE_HANG_TIMEOUT must be at least {3 * HEARTBEAT_SECONDS:g} seconds, got {raw}")
    return value


def _config_json(config: Any, keep_workers: bool = False) -> dict[str, Any]:
    """A ServableStartConfig as JSON for another process (`config_from_json`)."""
    data = dataclasses.asdict(config)
    data["servable_directory"] = os.fspath(config.servable_directory)
    if isinstance(config.dec_key, (bytes, bytearray)):
        data["dec_key"] = {"base64": base64.b64encode(bytes(config.dec_key)).decode()}
    if not keep_workers:
        data["num_parallel_workers"] = 0  # Python stages run in the front-ends
    return data


def config_from_json(data: dict[str, Any]) -> ServableStartConfig:
    data = dict(data)
    key = data.get("dec_key")
    if isinstance(key, dict) and "base64" in key:
        data["dec_key"] = base64.b64decode(key["base64"])
    return ServableStartConfig(**data)


def _progress(text: str) -> None:
    """A device process's loading step, reported here (where `mserve start` shows it)."""
    from ..serving.progress import LoadProgress, report

    try:
        data = json.loads(text)
        data["devices"] = tuple(data.get("devices") or ())
        report(LoadProgress(**data))
    except (ValueError, TypeError) as exc:
        log.debug("unreadable progress line %r: %s", text, exc)


def _forget_metrics(pid: int) -> None:
    """A dead process's live gauges leave the multiprocess metrics."""
    from ..ops.metrics import multiprocess_dir

    if multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
