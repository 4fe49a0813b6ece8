"""MkDocs hooks for the documentation site (mkdocs.yml names this file).

`mkdocs` run as a console script puts its own folder (the virtualenv's ``bin/``) first
on ``sys.path``, and that folder holds the ``mserve`` console script: mkdocstrings
would document that script instead of the ``mserve`` package. Dropping the folder
before the Python handler starts lets it find the installed package.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def on_startup(**_: Any) -> None:
    scripts = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != scripts]
