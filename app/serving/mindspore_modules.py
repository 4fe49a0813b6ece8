"""MindSpore 2.0's dataset modules that later MindSpore releases removed, for the
servable_config.py files written for MindSpore Serving 2.0.

MindSpore 2.0 still shipped ``mindspore.dataset.vision.c_transforms`` and
``mindspore.dataset.transforms.c_transforms`` (deprecated since MindSpore 1.8);
later releases, every one for Python 3.11 and later among them, keep only their
successors, ``mindspore.dataset.vision`` and ``mindspore.dataset.transforms``, with
the same operations (``Decode``, ``Resize``, ``Normalize``, ``HWC2CHW``, ``Compose``,
...). `install` adds an import finder, consulted after every other one, that makes
the old names modules holding the successors' names, so MindSpore Serving's ResNet
configuration imports as written. Where MindSpore still has the old modules, they
are found first and nothing changes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from typing import Any, Sequence

# Old module -> the module that took its place.
SUCCESSORS = {
    "mindspore.dataset.vision.c_transforms": "mindspore.dataset.vision",
    "mindspore.dataset.transforms.c_transforms": "mindspore.dataset.transforms",
}

_lock = threading.Lock()


class _SuccessorLoader(importlib.abc.Loader):
    """Makes the old module: a module of its own, holding the successor's names."""

    def __init__(self, successor: str):
        self.successor = successor

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default: a fresh module

    def exec_module(self, module: types.ModuleType) -> None:
        successor = importlib.import_module(self.successor)
        module.__dict__.update({k: v for k, v in vars(successor).items() if not k.startswith("__")})
        module.__doc__ = f"{module.__name__}, removed after MindSpore 2.0: the names of {self.successor} (mserve)."


class SuccessorFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of `SUCCESSORS` that no other finder found."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        successor = SUCCESSORS.get(fullname)
        if successor is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _SuccessorLoader(successor))


def install() -> None:
    """Add the finder at the end of ``sys.meta_path`` (once)."""
    with _lock:
        if not any(isinstance(finder, SuccessorFinder) for finder in sys.meta_path):
            sys.meta_path.append(SuccessorFinder())
