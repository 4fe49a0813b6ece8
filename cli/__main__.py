"""``python -m mserve.cli``: the same as the ``mserve`` command."""

from .main import main

main()
