"""``model_format="jax_export"``: a serialized ``jax.export.Exported`` artifact.

The file holds ``jax.export.export(jax.jit(f))(*specs).serialize()``; a model of
several files is several graphs (``Model.call(subgraph=i)``). Input and
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
    """Load the artifact(s) for one device (``devices``: a one-device group). Several
    files are several graphs of one model, as MindSpore Serving's ``model_file=[a, b]``:
    the first serves ``add_stage`` and ``Model.call()``, file ``i`` serves
    ``Model.call(..., subgraph=i)``."""
    if not files:
        raise ValueError("jax_export expects at least one model file")
    device = resolve_device(devices)
    graphs = [_load_one(path, device) for path in files]
    graphs[0].subgraphs = graphs  # type: ignore[attr-defined]
    return graphs[0]


def _load_one(path: Path, device: Any) -> JaxProgram:
    try:
        exported = export.deserialize(bytearray(path.read_bytes()))
    except Exception as exc:  # the deserializer raises assorted types on garbage
        raise ValueError(f"{path} is not a jax.export artifact: {exc}") from exc
    platform = "cuda" if device.platform == "gpu" else device.platform
    if platform not in exported.platforms:
        raise ValueError(
            f"{path} was exported for {', '.join(exported.platforms)}, not {platform}; "
            f"re-export with jax.export.export(..., platforms=[..., '{platform}'])"
        )
    if exported.nr_devices != 1:
        raise ValueError(f"{path} was exported for {exported.nr_devices} devices; mserve runs one device per model")
    return JaxProgram(exported.call, specs_from_avals(exported.in_avals), specs_from_avals(exported.out_avals), device)
