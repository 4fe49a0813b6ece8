"""The container image (Dockerfile): what can be checked without a container engine
always runs, the build itself where an engine answers.

* Always: the image copies every package folder ``pip install .`` needs, its CMD is
  a valid ``mserve start`` that serves the bundled servables here (same options, a
  free port on 127.0.0.1 instead of 0.0.0.0:5500), and the HEALTHCHECK command
  answers through the health port: failing while the server is not ready, passing
  once it is.
* Where ``docker`` (or ``podman``) reaches an engine: ``docker build`` of the CPU
  image, then a container serving the bundled servables until Docker's health check
  says healthy. Skipped with the reason otherwise (a CLI without a daemon, as on
  the development machine).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import requests

from support import BUNDLED, REPO, free_port
from test_cli import Started

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def exec_form(instruction: str) -> list[str]:
    return json.loads(next(rest for word, rest in instructions() if word == instruction))


def test_the_image_copies_every_package_folder():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = {rest.split()[0] for word, rest in instructions() if word == "COPY"}
    assert folders <= copied, folders - copied
    assert {"pyproject.toml"} <= {part for word, rest in instructions() if word == "COPY" for part in rest.split()}
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not folders & set(ignored)


def test_cmd_serves_and_the_healthcheck_follows_ready(tmp_path):
    entrypoint, cmd = exec_form("ENTRYPOINT"), exec_form("CMD")
    healthcheck = next(rest for word, rest in instructions() if word == "HEALTHCHECK")
    probe = json.loads(healthcheck.split("CMD", 1)[1])
    assert entrypoint == ["mserve", "start"] and cmd[0] == "/models"
    # The image's options, on this machine: the bundled servables, 127.0.0.1, free ports.
    health_port = free_port()
    args = [str(BUNDLED), *cmd[1:]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--health-port") + 1] = str(health_port)
    del args[args.index("--port"): args.index("--port") + 2]  # Started passes its own
    probe_code = probe[-1].replace(":5501/", f":{health_port}/")
    assert probe[:2] == ["python", "-c"] and probe_code != probe[-1]

    def healthy() -> bool:
        return subprocess.run([sys.executable, "-c", probe_code], capture_output=True, timeout=30).returncode == 0

    assert not healthy()  # nothing listens yet
    started = Started(args, tmp_path, free_port())
    try:
        started.wait_ready()
        assert healthy()
        r = requests.post(started.url + "/model/add:add_common",
                          json={"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]},
                          timeout=30)
        assert r.json() == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
    finally:
        assert started.stop() == 0, started.stderr
    assert not healthy()


def _engine() -> str | None:
    for tool in ("docker", "podman"):
        path = shutil.which(tool)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=30).returncode == 0:
            return path
    return None


def test_docker_build_and_run_until_healthy(tmp_path):
    engine = _engine()
    if engine is None:
        pytest.skip("no container engine answers here (docker/podman info failed): the image build is not checked")
    tag = f"mserve-test:{uuid.uuid4().hex[:8]}"
    build = subprocess.run([engine, "build", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-4000:]
    name = f"mserve-test-{uuid.uuid4().hex[:8]}"
    try:
        run = subprocess.run(
            [engine, "run", "-d", "--name", name, "-v", f"{BUNDLED}:/models:ro", "-p", "127.0.0.1::5500", tag],
            capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline:
            status = subprocess.run([engine, "inspect", "-f", "{{.State.Health.Status}}", name],
                                    capture_output=True, text=True, timeout=30).stdout.strip()
            if status in ("healthy", "unhealthy"):
                break
            time.sleep(1)
        assert status == "healthy", subprocess.run([engine, "logs", name], capture_output=True, text=True).stderr
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=60)
