"""Turning a distributed group on and off in this server process.

`start_group` listens for the hosts' agents, makes sharded ``jax_function`` models
load on the group (its backend is registered over the one-host one) and makes
``/ready`` answer 503 naming any missing host; `stop_group` undoes all of it, and
stops every host's JAX process.
"""

from __future__ import annotations

from ..backends import installed_backends, register_backend, unregister_backend
from .coordinator import DistributedGroup, GroupSettings
from .runtime import group_backend


def start_group(settings: GroupSettings) -> DistributedGroup:
    from .. import server

    group = DistributedGroup(settings).start()
    one_host = next(b for b in installed_backends() if b.name == "jax_function")
    register_backend(group_backend(group, one_host))
    server.default_runtime().add_readiness_probe(group.readiness)
    return group


def stop_group(group: DistributedGroup) -> None:
    from .. import server

    server.default_runtime().remove_readiness_probe(group.readiness)
    unregister_backend("jax_distributed")
    group.close()
