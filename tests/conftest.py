"""Shared fixtures. Servers are started per test module where possible: loading and
compiling is the slow part, requests are cheap."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The tests drive the server API in this process (server.registry() and friends);
# tests of device and front-end processes ask for them explicitly.
os.environ.setdefault("MSERVE_PROCESSES", "single")
# Servers the tests start as processes (`mserve start`) run one front-end each unless a
# test asks for more: the suite already runs one xdist worker per core and one more,
# so the default (a front-end per core, each with its own copy of JAX) would start
# several times as many processes as there are cores. How many the default is, is
# tested on its own (test_devices.py::test_default_workers).
os.environ.setdefault("MSERVE_WORKERS", "1")
# Tables the tests read are as wide as the CLI makes them off a terminal: pytest-xdist
# hands its workers COLUMNS=80, which would wrap and cut them (and a user's terminal
# width must not decide a test either).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

from support import BUNDLED, serving  # noqa: E402

from mserve import server  # noqa: E402


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the cores this process may use. Much of a
    test's time goes to waiting for a server it started (processes of their own) to
    load, so one worker per core leaves cores idle (measured on 2 cores: 1.45 of 2
    busy, 9.2 min; with 3 workers, 7.3 min). ``--maxprocesses`` still caps it."""
    return len(os.sched_getaffinity(0)) + 1


@pytest.fixture(scope="module")
def add_url():
    """The bundled add servable behind a real server."""
    with serving(server.ServableStartConfig(BUNDLED, "add")) as url:
        yield url
