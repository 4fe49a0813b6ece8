"""Turning a distributed group on and off in a server.

`serve_over_hosts` is how a server (``mserve start --hosts``, MindSpore's
``distributed.start_servable``) asks for one. In the default process mode it only
records the group's settings: the device process that loads the distributed model
starts the group itself (`start_group` there, from `mserve.runtime.device_role`),
so batches of every front-end process meet in its batcher and each runs once on all
hosts; the other processes follow its readiness (`status`). In single-process mode
the group is started in this process.

`start_group` listens for the hosts' agents, makes sharded ``jax_function`` models
load on the group (its backend is registered over the one-host one) and makes
``/ready`` answer 503 naming any missing host; `stop_group` undoes all of it, and
stops every host's JAX process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..backends import installed_backends, register_backend, unregister_backend
from .coordinator import DistributedGroup, GroupSettings
from .links import parse_address
from .runtime import group_backend


def serve_over_hosts(runtime: Any, settings: GroupSettings) -> DistributedGroup | None:
    """Serve this runtime's distributed model over the hosts of ``settings``: the
    group started here (single-process mode; returned, stopped with the runtime),
    or by the device process that loads the model (None). Call before
    ``start_servables``; a bad address or host count is a ValueError."""
    parse_address(settings.distributed_address)
    if settings.hosts < 1:
        raise ValueError(f"hosts must be 1 or more, got {settings.hosts}")
    if runtime.processes() == "devices":
        runtime.distributed = dataclasses.asdict(settings)
        return None
    group = start_group(settings, runtime)
    runtime.on_stop(lambda: stop_group(group, runtime))
    return group


def start_group(settings: GroupSettings, runtime: Any = None) -> DistributedGroup:
    """Start a group in this process, serving ``runtime``'s distributed model
    (None: `mserve.server`'s default runtime)."""
    runtime = runtime if runtime is not None else _default_runtime()
    group = DistributedGroup(settings).start()
    one_host = next(b for b in installed_backends() if b.name == "jax_function")
    register_backend(group_backend(group, one_host))
    runtime.add_readiness_probe(group.readiness)
    return group


def stop_group(group: DistributedGroup, runtime: Any = None) -> None:
    runtime = runtime if runtime is not None else _default_runtime()
    runtime.remove_readiness_probe(group.readiness)
    unregister_backend("jax_distributed")
    group.close()


def _default_runtime() -> Any:
    from .. import server

    return server.default_runtime()
