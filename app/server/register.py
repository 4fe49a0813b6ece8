"""MindSpore Serving's ``mindspore_serving.server.register``, at the same place:
``from mserve.server.register import declare_model, register_method, add_stage``
works as ``from mserve import register`` does. Everything public in
`mserve.register` (the one implementation) is reachable here.
"""

from __future__ import annotations

from typing import Any

from .. import register as implementation
from ..register import Model, add_stage, declare_model, register_method

__all__ = list(getattr(implementation, "__all__", ["declare_model", "register_method", "add_stage", "Model"]))


def __getattr__(name: str) -> Any:
    """Public names `mserve.register` has beyond those imported above."""
    if not name.startswith("_") and hasattr(implementation, name):
        return getattr(implementation, name)
    raise AttributeError(f"module 'mserve.server.register' has no attribute {name!r}")
