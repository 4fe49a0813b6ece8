"""MindSpore Serving's ``server.master``: the master's settings (``master.context``)."""

from . import context

__all__ = ["context"]
