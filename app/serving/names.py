"""Which names a servable may have, decided in one place for the loader and `mserve new`.

``servable_config.py`` is imported as the module ``NAME.servable_config`` of the
package ``NAME`` (the servable's folder), as MindSpore Serving imports it. So a
servable name must be a Python identifier, and it must not be a module that Python
or the server already has (``json``, ``numpy``, ``mserve``): the servable's package
would take that module's place in ``sys.modules``, or be refused at load because the
place is taken.
"""

from __future__ import annotations

import keyword
import sys
from typing import Any, Callable

SERVABLE_PACKAGE = "__mserve_servable__"  # set on the packages the loader makes for servables


def servable_name_problem(name: str, is_servable: Callable[[Any], bool] | None = None) -> str | None:
    """Why ``name`` cannot be a servable's name, or None when it can. A module in
    ``sys.modules`` that is a servable's own package (an earlier load) is no clash."""
    why = f"servable_config.py is imported as {name}.servable_config (as MindSpore Serving does)"
    if not name.isidentifier() or keyword.iskeyword(name):
        return (f"servable name {name!r}: {why}, so the name must be a Python identifier "
                f"(letters, digits and '_', not starting with a digit, not a keyword)")
    existing = sys.modules.get(name)
    if existing is not None and getattr(existing, SERVABLE_PACKAGE, False):
        return None
    if existing is not None or name in sys.stdlib_module_names:
        where = getattr(existing, "__file__", None) or "the Python standard library"
        return f"servable name {name!r}: the module name {name!r} is already taken by {where}; {why}: pick another name"
    return None
