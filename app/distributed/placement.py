"""Which models span hosts, and which device process holds the server's group.

A model spans the hosts of a distributed group when it declares a ``sharding``
(a sharded ``jax_function`` model) or a ``rank_size`` (MindSpore's
``distributed.declare_servable``); other models of the same server load on the main
host as usual. In the default process mode the group lives in one device process:
the one that loads such a model (`group_process`). Cheap to import: the
supervising process asks this without loading JAX.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

Key = TypeVar("Key")


def spans_hosts(options: Mapping[str, Any]) -> bool:
    return "sharding" in options or "rank_size" in options


def servable_spans_hosts(config: Any) -> bool:
    """Whether a servable (a ``ServableStartConfig``) has a model that spans hosts.
    Reads its servable_config.py; one that does not load says no here and reports
    its error when its device process loads it."""
    from ..serving.servable import load_definition

    try:
        definition = load_definition(config.servable_directory, config.servable_name)
    except Exception:
        return False
    return any(spans_hosts(model.options) for model in definition.models)


def group_process(processes: Sequence[tuple[Key, Sequence[Any]]]) -> Key:
    """Of (device process, its servable configs), the one whose servables span
    hosts (the first, if none does: it waits for the hosts all the same). Two
    device processes with such servables: a `ServableLoadError`, one distributed
    model per server."""
    from ..errors import ServableLoadError

    spanning = [key for key, configs in processes if any(servable_spans_hosts(c) for c in configs)]
    if len(spanning) > 1:
        raise ServableLoadError(
            f"servables that span hosts are configured on {len(spanning)} device processes "
            f"({', '.join(map(str, spanning))}): a server serves one distributed model, on one device id"
        )
    return spanning[0] if spanning else processes[0][0]
