"""A front-end process's servables: built from the manifest, run in device processes.

`FrontendModels.apply` turns a manifest (`manifest.py`) into this process's
registry: each servable's definition is loaded here once (servable_config.py runs in
every front-end: its Python stages run here), and each version gets stand-ins for
its model stages (`remote.RemoteModelStage`, plus a `remote.RemoteBatcher` where the
device process batches across requests). No model file is opened and no JAX client
is created in a front-end, with one exception:

Front-end copies. A small model on the CPU that is not batched across requests
(``frontend_copy`` in the manifest, see ``ServableStartConfig.frontend_copy_max_kb``)
is also loaded here, on this process's CPU, and runs in-process (on the HTTP I/O
thread for quick predicts): for the add servable a round trip to the device process
costs about 140 µs, several times the model call itself, and on a small machine the
extra process competes for the same cores (benchmarks/bench_serving.py shows the
difference). Such a front-end imports JAX (CPU only: ``JAX_PLATFORMS=cpu``); one
without copies never does. Accelerator models never get front-end copies.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..runtime.loading import LoadedServable
from ..serving.model_stage import ModelStage
from ..serving.servable import LoadedVersion, Servable, load_definition
from .remote import DeviceClient, RemoteBatcher, RemoteModelStage
from .supervisor import config_from_json

log = logging.getLogger("mserve.devices.frontend")


class FrontendModels:
    """Keeps ``state`` (`mserve.runtime.runtime.Runtime`) following the manifest. ``copies``:
    load the front-end copies of small CPU models (front-ends do; the supervising
    process, which serves no requests, does not)."""

    def __init__(self, state: Any, frontend: Any = None, copies: bool = True):
        self.state = state
        self.frontend = frontend
        self.copies = copies
        self.clients: dict[str, DeviceClient] = {}
        self.definitions: dict[str, Any] = {}
        self._built: dict[tuple[str, int], tuple[str, LoadedVersion]] = {}
        self._copies: dict[tuple[str, ...], ModelStage] = {}  # front-end copies, by model files

    def _client(self, group: str, socket_path: str) -> DeviceClient:
        client = self.clients.get(group)
        if client is None or client.path != socket_path:
            client = self.clients[group] = DeviceClient(group, socket_path, self.frontend)
        return client

    def apply(self, data: dict[str, Any]) -> None:
        registry = self.state.registry
        for group, info in data["devices"].items():
            self._client(group, info["socket"])
        present = set()
        for entry in data["servables"]:
            name = entry["name"]
            definition = self.definitions.get(name)
            if definition is None:
                definition = self.definitions[name] = load_definition(entry["directory"], name)
            config = config_from_json(entry["config"]) if entry.get("config") else None
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
                self.state.configured[name] = LoadedServable(config, servable, [])
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
        backends = {}
        subgraphs = {}
        for model in definition.models:
            spec = version["models"][str(model.index)]
            backends[model.index] = tuple(spec.get("backend", ("?", "?")))
            clients = [self.clients[g] for g in spec["groups"]]
            # Graphs 1.. of a model of several files run in the device process, even
            # where the first has a front-end copy (Model.call(subgraph=i) is rare).
            for i, graph in enumerate(spec.get("subgraphs", ()), start=1):
                subgraphs[(model.index, i)] = RemoteModelStage(
                    model, dict(spec, **graph), clients, servable.name, number, subgraph=i,
                )
            if spec.get("frontend_copy") and self.copies:
                stages[model.index] = self._copy(model, spec)
                continue
            stage = RemoteModelStage(model, spec, clients, servable.name, number)
            stages[model.index] = stage
            if spec["cross_request"]:
                batchers[model.index] = RemoteBatcher(stage, spec["max_delay"])
        for stage in stages.values():  # errors name what feeds each model input
            stage.name_inputs(list(definition.methods.values()))
        workers = config.num_parallel_workers if config is not None else 0
        pool = ThreadPoolExecutor(workers, thread_name_prefix=f"mserve-{servable.name}-stage") if workers > 0 else None
        return LoadedVersion(servable.name, number, definition, stages, batchers, pool, backends, subgraphs)

    def _copy(self, model: Any, spec: dict[str, Any]) -> ModelStage:
        """This front-end's own copy of a small CPU model, loaded and warm."""
        key = tuple(spec["files"])
        stage = self._copies.get(key)
        if stage is not None:
            stage.placement = _copy_placement(spec)  # type: ignore[attr-defined]
            return stage
        from ..backends import Device, load_model
        from ..backends.jax_runtime import prefer_sync_cpu_dispatch
        from ..serving.compile_cache import enable_compile_cache

        enable_compile_cache()
        prefer_sync_cpu_dispatch()  # before this process's JAX makes its CPU client
        runtime = load_model(model.model_format, [Path(f) for f in spec["files"]], model.options, Device("cpu", 0),
                             context=getattr(model, "context", None))
        stage = ModelStage(model, [runtime], spec["max_batch_size"], spec["buckets"] or None)
        stage.warm_up()
        stage.placement = _copy_placement(spec)  # type: ignore[attr-defined]
        self._copies[key] = stage
        log.info("front-end copy of %s loaded (%d program(s) compiled)", model.model_files[0], stage.compile_count)
        return stage


def _copy_placement(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import os

    return list(spec["placement"]) + [{"device": "cpu:0", "pid": os.getpid(), "role": "front-end copy"}]
