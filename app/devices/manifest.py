"""The manifest: what the device processes serve, as the front-ends see it.

`DeviceSupervisor` writes ``manifest.json`` in the server's run directory (atomically,
with a growing ``generation``) whenever a device process starts serving, dies, or
hot reload changes its versions. Each front-end follows the file (`Follower`) and
builds its registry from it: per servable, the definition (its own run of
servable_config.py, for the Python stages) and, per version, stand-ins for the model
stages (`remote.RemoteModelStage`) that call the device processes listed for it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from ..rundir import ReplacedFile

log = logging.getLogger("mserve.devices.manifest")

FILE_NAME = "manifest.json"


def write(
    path: Path, generation: int, described: list[dict[str, Any]], configs: dict[str, Any], down: set[str] = set(),
) -> None:
    """Merge the device processes' descriptions into one manifest at ``path``
    (``down``: groups whose process is restarting; their last description stays)."""
    servables: dict[str, dict[str, Any]] = {}
    devices = {}
    for device in described:
        devices[device["group"]] = {
            "socket": device["socket"], "pid": device["pid"], "devices": device["devices"],
            "up": device["group"] not in down,
        }
        for s in device["servables"]:
            entry = servables.setdefault(s["name"], {
                "name": s["name"], "directory": s["directory"], "config": configs.get(s["name"]), "versions": {},
            })
            for number, version in s["versions"].items():
                merged = entry["versions"].setdefault(number, {"models": {}})
                for index, model in version["models"].items():
                    found = merged["models"].setdefault(index, dict(model, groups=[], placement=[], instances=[]))
                    found["groups"].append(device["group"])
                    found["instances"].extend(model.get("instances", []))
                    found["placement"].extend(
                        {"device": d, "pid": device["pid"], "role": "device process"} for d in model["devices"]
                    )
    data = {"generation": generation, "devices": devices, "servables": list(servables.values())}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class Follower:
    """Calls ``apply(manifest)`` with each new generation of the manifest at ``path``."""

    def __init__(self, path: str | os.PathLike, apply: Callable[[dict[str, Any]], None], interval: float = 0.1):
        self.path = Path(path)
        self.apply = apply
        self.interval = interval
        self.generation = 0
        self._file = ReplacedFile(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """Apply the manifest if it changed; whether it did."""
        try:
            data = self._file.read_if_new(read)
        except (OSError, ValueError) as exc:  # written atomically, so this is unexpected
            log.error("cannot read %s: %s", self.path, exc)
            return False
        if data is None or data["generation"] == self.generation:
            return False
        self.apply(data)
        self.generation = data["generation"]
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mserve-manifest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:
                log.exception("applying %s failed", self.path)

    def stop(self) -> None:
        self._stop.set()
