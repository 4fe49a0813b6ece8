"""A front-end process's servables: built from the manifest, run in device processes.

`FrontendModels.apply` turns a manifest (`manifest.py`) into this process's
registry: each servable's definition is loaded here once (servable_config.py runs in
every front-end: its Python stages run here), and each version gets stand-ins for
its model stages (`remote.RemoteModelStage`, plus a `remote.RemoteBatcher` where the
device process batches across requests). No model file is opened and no JAX client
is created in a front-end.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..serving.servable import LoadedVersion, Servable, load_definition
from .remote import DeviceClient, RemoteBatcher, RemoteModelStage

log = logging.getLogger("mserve.devices.frontend")


class FrontendModels:
    """Keeps ``state`` (`mserve.server._State`) following the manifest."""

    def __init__(self, state: Any, frontend: Any = None):
        self.state = state
        self.frontend = frontend
        self.clients: dict[str, DeviceClient] = {}
        self.definitions: dict[str, Any] = {}
        self._built: dict[tuple[str, int], tuple[str, LoadedVersion]] = {}

    def _client(self, group: str, socket_path: str) -> DeviceClient:
        client = self.clients.get(group)
        if client is None or client.path != socket_path:
            client = self.clients[group] = DeviceClient(group, socket_path, self.frontend)
        return client

    def apply(self, data: dict[str, Any]) -> None:
        from .. import server

        registry = self.state.registry
        for group, info in data["devices"].items():
            self._client(group, info["socket"])
        present = set()
        for entry in data["servables"]:
            name = entry["name"]
            definition = self.definitions.get(name)
            if definition is None:
                definition = self.definitions[name] = load_definition(entry["directory"], name)
            config = server.ServableStartConfig(**entry["config"]) if entry.get("config") else None
            servable = Servable(name, Path(entry["directory"]), definition)
            for number, version in sorted(entry["versions"].items(), key=lambda kv: int(kv[0])):
                key = (name, int(number))
                present.add(key)
                signature = json.dumps([version, [data["devices"][g]["socket"] for m in version["models"].values()
                                                  for g in m["groups"]]], sort_keys=True)
                built = self._built.get(key)
                if built is not None and built[0] == signature:
                    continue
                loaded = self._version(servable, int(number), version, config)
                registry.add(servable, loaded)
                self._built[key] = (signature, loaded)
                if built is not None and built[1].stage_pool is not None:
                    built[1].stage_pool.shutdown(wait=False)  # its requests in flight finish
            if config is not None:
                self.state.configured[name] = server._Loaded(config, servable, [])
        for name, servable in list(registry.servables().items()):
            for number in list(servable.versions):
                if (name, number) not in present:
                    retired = registry.remove(name, number)
                    self._built.pop((name, number), None)
                    if retired is not None and retired.stage_pool is not None:
                        retired.stage_pool.shutdown(wait=False)
                    log.info("servable %s version %d is no longer served", name, number)

    def _version(self, servable: Servable, number: int, version: dict[str, Any], config: Any) -> LoadedVersion:
        definition = servable.definition
        stages = {}
        batchers = {}
        for model in definition.models:
            spec = version["models"][str(model.index)]
            clients = [self.clients[g] for g in spec["groups"]]
            stage = RemoteModelStage(model, spec, clients, servable.name, number)
            stages[model.index] = stage
            if spec["cross_request"]:
                batchers[model.index] = RemoteBatcher(stage, spec["max_delay"])
        workers = config.num_parallel_workers if config is not None else 0
        pool = ThreadPoolExecutor(workers, thread_name_prefix=f"mserve-{servable.name}-stage") if workers > 0 else None
        return LoadedVersion(servable.name, number, definition, stages, batchers, pool)
