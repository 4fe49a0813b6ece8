"""The main host's stand-in for a sharded model that spans hosts, and its backend.

`group_backend(group)` is a `Backend` for ``jax_function`` models: registered while a
server runs with a distributed group, it takes the models that declare a
``sharding`` (the others load on this host as always). Loading one attaches it to the
group, waits for every host (up to ``wait_agents``), and returns a
`DistributedRuntime`: to the model stage, batcher, buckets and warm-up it is one
more runtime whose ``predict`` runs a batch on every host of the group.

The main host reads only the weights' shapes (the file header) to trace the model's
input and output specs; the weights themselves are read by the hosts, each its slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backends import Backend, LoadRequest, ModelRuntime, TensorSpec, installed_backends, register_backend
from .coordinator import DistributedGroup, GroupLoadError, ModelOrders
from .model_module import load_model_module
from .shards import WeightSlices, file_digest, model_specs


class GroupDevice:
    """How metrics and /models name where the model runs: ``hosts:N``."""

    platform = "hosts"

    def __init__(self, hosts: int):
        self.id = hosts

    def __str__(self) -> str:
        return f"{self.platform}:{self.id}"


class DistributedRuntime:
    """A model instance whose devices are every device of every host of the group."""

    def __init__(self, group: DistributedGroup, inputs: list[TensorSpec], outputs: list[TensorSpec], version: int):
        self.group = group
        self.version = version  # the group refuses it once a reload has replaced it
        self.inputs = inputs
        self.outputs = outputs
        self.device = GroupDevice(group.settings.hosts)
        self._warm: set[tuple] = set()

    @property
    def devices(self) -> list[str]:
        """Every device of the group, as ``host<I>/<platform>:<id>`` (while it serves)."""
        return [f"host{index}/{name}" for index, report in sorted(self.group.reports.items())
                for name in report.get("devices", [])] or [str(self.device)]

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.group.run(arrays, version=self.version)

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        listed = [tuple(tuple(s) for s in one) for one in shapes]
        self.group.warm_up(listed)
        self._warm.update(listed)

    @property
    def compile_count(self) -> int:
        return len(self._warm)


def orders_for(request: LoadRequest, model_format: str, weights: Path) -> ModelOrders:
    """What the hosts load, from the model's files (``DIR/NAME/VERSION/FILE``)."""
    version_folder = request.files[0].parent
    servable_folder = version_folder.parent
    if not version_folder.name.isdigit():
        raise ValueError(f"{request.files[0]}: a distributed model's files live in a version folder")
    digests = {"servable_config.py": file_digest(servable_folder / "servable_config.py")}
    for path in [*request.files, weights]:
        digests[str(Path(path).relative_to(servable_folder))] = file_digest(path)
    return ModelOrders(
        servable_directory=str(servable_folder.parent.resolve()), servable=servable_folder.name,
        version=int(version_folder.name), model_files=[Path(p).name for p in request.files], digests=digests,
        model_format=model_format, devices=int(request.options.get("rank_size") or 0),
    )


def load_on_group(group: DistributedGroup, request: LoadRequest) -> DistributedRuntime:
    if request.config_file is not None or request.context:
        raise ValueError("a distributed model has no use for config_file or context; remove them")
    if len(request.files) != 1:
        raise ValueError(f"a distributed model has one model file, got {len(request.files)}")
    if request.files[0].suffix == ".py":  # distributed.declare_servable: a model file
        model_format = "jax_distributed"
        options, weights_file = load_model_module(request.files[0])
    else:
        model_format, options, weights_file = "jax_function", request.options, request.files[0]
    weights = WeightSlices(weights_file)
    try:
        inputs, outputs = model_specs(options, weights.shapes())
    finally:
        weights.close()
    orders = orders_for(request, model_format, weights_file)
    before = group.served()  # hot reload: what to serve again should this version fail
    group.attach(orders, [spec.dtype for spec in inputs])
    try:
        group.wait_ready()
    except GroupLoadError:
        if before[0] is not None and before[0] != orders:
            group.restore(*before)
        raise
    return DistributedRuntime(group, inputs, outputs, orders.version)


DISTRIBUTED_FORMAT = "jax_distributed"  # the model of distributed.declare_servable


def group_backend(group: DistributedGroup, one_host: Backend) -> Backend:
    """Sharded ``jax_function`` models and declared distributed servables on the
    group; other ``jax_function`` models as ``one_host`` (the ordinary backend) loads them."""

    def load(request: LoadRequest) -> ModelRuntime:
        if "sharding" in request.options or "rank_size" in request.options:
            return load_on_group(group, request)
        return one_host.load(request)

    return Backend(
        "jax_distributed", ("jax_function", DISTRIBUTED_FORMAT), one_host.device_types, load, can_shard=True,
        default_device_type=one_host.default_device_type,
        shards=lambda options: "sharding" in options or "rank_size" in options,
        description=f"sharded jax_function models over the {group.settings.hosts} host(s) at {group.address}",
    )


def refuse_without_group(request: LoadRequest) -> ModelRuntime:
    raise ValueError(
        "this servable spans hosts (distributed.declare_servable): start it with "
        "mserve.server.distributed.start_servable, or `mserve start --distributed-address HOST:PORT --hosts N`"
    )


def ensure_refusal_registered() -> None:
    """Without a distributed group, a declared distributed servable says how to
    serve it (a group's backend, registered later, wins over this one)."""
    if not any(b.serves(DISTRIBUTED_FORMAT, None) for b in installed_backends()):
        register_backend(Backend(
            "jax_distributed_needs_hosts", (DISTRIBUTED_FORMAT,), ("cpu", "gpu", "tpu"), refuse_without_group,
            can_shard=True, shards=lambda options: True, description="distributed servables need a distributed group",
        ))
