"""MindSpore Serving's ``server._servable_local``: ``merge_config``, as its tests use it.

Several `ServableStartConfig` of one servable become one: versions and device ids
united, ``version_number=0`` taken as the newest version folder first (so ``0`` and
the newest number are one version), each config checked against the others.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from ..serving.servable import list_versions


def merge_config(configs: Sequence[Any]) -> list[Any]:
    """The configs merged per servable, in first-seen order (see the module docstring)."""
    from . import ServableStartConfig, merge_configs

    resolved = []
    for config in configs:
        if not isinstance(config, ServableStartConfig):
            raise RuntimeError(f"The item of parameter 'servable_configs' should be ServableStartConfig, but actually "
                               f"{type(config)}")
        resolved.append(dataclasses.replace(config, version_number=_newest_for_zero(config)))
    merged = merge_configs(resolved)
    for config in merged:
        if isinstance(config.device_ids, (list, tuple)):
            config.device_ids = tuple(config.device_ids)
        elif isinstance(config.device_ids, int):
            config.device_ids = (config.device_ids,)
    return merged


def _newest_for_zero(config: Any) -> Any:
    folder = Path(config.servable_directory) / config.servable_name
    present = list_versions(folder) if folder.is_dir() else []
    numbers = [present[-1] if n == 0 and present else n for n in config.versions()]
    numbers = list(dict.fromkeys(numbers))
    return numbers[0] if len(numbers) == 1 else numbers
