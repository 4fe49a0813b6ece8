"""``model_format="jax_export"``: a serialized ``jax.export.Exported`` artifact.

The file holds ``jax.export.export(jax.jit(f))(*specs).serialize()``. Input and
output dtypes and shapes come from the artifact itself (a leading symbolic dimension
such as ``b`` is a free batch size). The artifact must have been exported for the
platform it runs on (``platforms=("cpu", "cuda")`` covers both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from jax import export

from .jax_runtime import JaxProgram, resolve_device, specs_from_avals


def load(files: list[Path], options: dict[str, Any], devices: Sequence[Any]) -> JaxProgram:
    """Load the artifact for one device (``devices``: a one-device group)."""
    if len(files) != 1:
        raise ValueError(f"jax_export expects exactly one model file, got {len(files)}")
    path = files[0]
    try:
        exported = export.deserialize(bytearray(path.read_bytes()))
    except Exception as exc:  # the deserializer raises assorted types on garbage
        raise ValueError(f"{path} is not a jax.export artifact: {exc}") from exc
    device = resolve_device(devices)
    platform = "cuda" if device.platform == "gpu" else device.platform
    if platform not in exported.platforms:
        raise ValueError(
            f"{path} was exported for {', '.join(exported.platforms)}, not {platform}; "
            f"re-export with jax.export.export(..., platforms=[..., '{platform}'])"
        )
    if exported.nr_devices != 1:
        raise ValueError(f"{path} was exported for {exported.nr_devices} devices; mserve runs one device per model")
    return JaxProgram(exported.call, specs_from_avals(exported.in_avals), specs_from_avals(exported.out_avals), device)
