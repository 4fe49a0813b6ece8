"""The device process role: ``python -m mserve.runtime.device_role``, started by
`mserve.devices.supervisor.DeviceSupervisor` with its settings as JSON on stdin.

It builds a single-process `Runtime`, loads its device's servables into it, and
serves their model calls to the front-ends through a `DeviceServer`, whose
retirement of versions (hot reload) lets the front-ends switch first. It prints
``PROGRESS``, ``READY``, ``SERVES`` and ``FAILED`` lines for the supervisor (see
`mserve.devices.process`), and ``ALIVE`` every second for the supervisor's
watchdog. SIGTERM: stop listening, let calls in flight finish, unload, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from .. import logsetup
from ..devices.process import DeviceServer, describe, die_with_parent, local_device_ids
from ..devices.supervisor import HEARTBEAT_SECONDS
from ..lifetime import exit_at_once
from .runtime import Runtime


def _forward_progress(event: Any) -> None:
    import dataclasses

    print("PROGRESS " + json.dumps(dataclasses.asdict(event)), flush=True)


def _watch_registry(runtime: Runtime, device_server: DeviceServer, stop: threading.Event) -> None:
    """Report versions that hot reload added or retired."""
    seen = runtime.registry.servables()
    while not stop.wait(0.05):
        now = runtime.registry.servables()
        if now is not seen:
            seen = now
            device_server.report()


def _heartbeat(device_server: DeviceServer, stop: threading.Event) -> None:
    """``ALIVE`` on stdout every `HEARTBEAT_SECONDS`: the supervisor restarts a device
    process that falls silent (stopped, or hung with the interpreter locked)."""
    while not stop.wait(HEARTBEAT_SECONDS):
        device_server.say("ALIVE")


def _start_hosts(runtime: Runtime, settings: dict[str, Any]) -> Any:
    """Start the distributed group here, where the front-ends' batches meet, and
    publish its readiness for the front-ends' ``/ready`` (`mserve.distributed.status`)."""
    from ..distributed.coordinator import GroupSettings
    from ..distributed.serving import start_group, stop_group
    from ..distributed.status import StatusWriter

    group = start_group(GroupSettings(**settings["distributed"]), runtime)
    writer = StatusWriter(group.readiness, settings["distributed_status"]).start()

    def stop() -> None:
        writer.stop()
        stop_group(group, runtime)

    runtime.on_stop(stop)
    return group


def main() -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    die_with_parent()
    settings = json.loads(sys.stdin.read())
    group = settings["group"]
    handler = logging.StreamHandler()
    handler.setFormatter(logsetup.formatter(f"device {group}, pid {os.getpid()}"))  # one format (mserve.logsetup)
    root = logging.getLogger("mserve")
    root.addHandler(handler)
    root.setLevel(settings["log_level"])
    root.propagate = False

    from ..devices.supervisor import config_from_json
    from ..errors import ServableLoadError

    runtime = Runtime(processes_mode="single")  # this process is the in-process server of its device
    device_server = DeviceServer(runtime, settings["socket"], group)
    runtime.retire = device_server.retire
    try:
        if settings.get("distributed"):  # this process serves the model that spans hosts
            _start_hosts(runtime, settings)
        from ..ops import metrics

        configs = []
        for data in settings["configs"]:
            local = local_device_ids(data.get("device_type"), data["device_ids"], settings["remapped"])
            kind = "cpu" if (data.get("device_type") or "").lower() == "cpu" else "gpu"
            for mine, machine in zip(local, data["device_ids"]):
                if mine != machine:  # report devices as the start script numbers them
                    metrics.DEVICE_RENAMES[f"{kind}:{mine}"] = f"{kind}:{machine}"
            configs.append(config_from_json(dict(data, device_ids=local)))
        from ..serving.progress import listening

        with listening(_forward_progress):  # the supervisor's process shows it (mserve start's display)
            runtime.start_servables(configs, poll_interval=settings.get("poll_interval"))
        device_server.listen()
    except (ServableLoadError, RuntimeError, ValueError, OSError) as exc:
        print("FAILED " + str(exc).replace("\n", " "), flush=True)
        if settings.get("distributed"):
            runtime.stop(drain_timeout=0)  # the hosts' JAX processes stop now, not when they notice
        return 1
    print("READY " + json.dumps(describe(runtime, group, settings["socket"])), flush=True)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(device_server, stop), name="mserve-heartbeat", daemon=True).start()
    if settings.get("poll_interval"):
        threading.Thread(target=_watch_registry, args=(runtime, device_server, stop), daemon=True).start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    stop.set()
    device_server.stop(settings.get("drain_timeout", 30.0))
    runtime.stop(drain_timeout=0)  # stops the distributed group too: every host's JAX process
    exit_at_once(0)  # everything is closed; the interpreter's teardown would eat into the drain timeout
    return 0


if __name__ == "__main__":
    sys.exit(main())
