"""Readiness and hot reload, each test with a server of its own (in-process).

* /ready answers 503 while a slow servable loads (the server listens first), then 200.
* Hot reload: version 2 appears while a client loop sends requests, none fails, and 2
  becomes the latest (1 is retired); a broken version 3 is reported and 2 keeps
  serving; removing version 2 rolls back to 1 and unloads 2.
* A graceful stop with a grace period: /ready 503 while requests are still served.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from mserve import server

from support import export_to, spec, write_servable

SLOW_CONFIG = """
    import time

    from mserve import register

    time.sleep(1.5)  # a slow load (think: a big model being read)


    def echo(x):
        return x


    @register.register_method(output_names=["y"])
    def predict(x):
        return register.add_stage(echo, x, outputs_count=1)
"""

INC_CONFIG = """
    from mserve import register

    model = register.declare_model(model_file="inc.jaxexport", model_format="jax_export", with_batch_dim=True)


    @register.register_method(output_names=["y"])
    def predict(x):
        return register.add_stage(model, x, outputs_count=1)
"""


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def stop_server():
    yield
    server.stop(drain_timeout=5)


def test_ready_is_503_until_warm_up_ends(tmp_path, stop_server):
    write_servable(tmp_path, "slow", SLOW_CONFIG)
    (tmp_path / "slow" / "1").mkdir()
    url = server.start_restful_server("127.0.0.1:0").url  # listen first, then load
    assert requests.get(url + "/ready").status_code == 503  # nothing configured yet

    errors: list = []
    loader = threading.Thread(
        target=lambda: _catch(errors, server.start_servables, server.ServableStartConfig(tmp_path, "slow"))
    )
    loader.start()
    # (a Response is falsy when not ok, hence the 1-tuples)
    (r,) = wait_for(lambda: (r := requests.get(url + "/ready")).json()["status"] == "loading servables" and (r,),
                    what="/ready to say loading")
    assert r.status_code == 503 and r.json()["ready"] is False and r.headers["Retry-After"] == "1"
    assert requests.get(url + "/health").status_code == 200  # alive while loading
    early = requests.post(url + "/model/slow:predict", json={"instances": [{"x": 1}]})
    assert early.status_code == 503 and "loading" in early.json()["error_msg"]
    assert "Retry-After" in early.headers

    loader.join(30)
    assert not errors
    r = requests.get(url + "/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert requests.post(url + "/model/slow:predict", json={"instances": [{"x": 1}]}).json() == {
        "instances": [{"y": 1}]
    }
    metrics = requests.get(url + "/metrics").text
    assert "\nmserve_ready 1.0" in metrics


def _catch(errors: list, fn, *args):
    try:
        fn(*args)
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


# --------------------------------------------------------------------------- hot reload


def add_version(root: Path, version: int, delta: float) -> None:
    """Version folder ``version`` with a model computing x + delta, moved in whole."""
    staging = root / f".staging-{version}"
    export_to(staging / "inc.jaxexport", lambda x: x + delta, spec("b, 2"))
    os.rename(staging, root / "inc" / str(version))


def versions(url: str) -> dict:
    return requests.get(url + "/model/inc").json()


class ClientLoop:
    """Sends predicts back to back until stopped; keeps every answer."""

    def __init__(self, url: str, threads: int = 3):
        self.url = url
        self.answers: list[tuple[int, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                r = session.post(self.url + "/model/inc:predict", json={"instances": [{"x": [1.0, 1.0]}]}, timeout=30)
                self.answers.append((r.status_code, r.json()))
            except Exception as exc:  # a dropped connection counts as a failure
                self.answers.append((0, repr(exc)))

    def __enter__(self) -> "ClientLoop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def failures(self) -> list:
        return [a for a in self.answers if a[0] != 200]

    def values(self) -> set:
        return {a[1]["instances"][0]["y"][0] for a in self.answers if a[0] == 200}


def test_hot_reload(tmp_path, stop_server):
    write_servable(tmp_path, "inc", INC_CONFIG)
    add_version(tmp_path, 1, 1.0)
    url = server.start_restful_server("127.0.0.1:0").url
    server.start_servables(server.ServableStartConfig(tmp_path, "inc", max_batch_size=2), poll_interval=0.1)
    assert versions(url)["latest_version"] == 1

    # Version 2 arrives while requests flow: none fails, then 2 is the latest and 1 is gone.
    with ClientLoop(url) as loop:
        wait_for(lambda: len(loop.answers) > 20, what="traffic")
        add_version(tmp_path, 2, 2.0)
        wait_for(lambda: [v["version"] for v in versions(url)["versions"]] == [2], what="version 2 alone")
        seen = len(loop.answers)
        wait_for(lambda: len(loop.answers) > seen + 20, what="traffic on version 2")
    assert loop.failures() == []
    assert loop.values() == {2.0, 3.0}  # 1 + 1 before, 1 + 2 after
    assert loop.answers[-1][1] == {"instances": [{"y": [3.0, 3.0]}]}
    assert versions(url)["latest_version"] == 2
    missing = requests.post(url + "/model/inc/version/1:predict", json={"instances": [{"x": [1.0, 1.0]}]})
    assert missing.status_code == 404

    # A broken version 3 is reported; 2 keeps serving.
    (tmp_path / "inc" / "3").mkdir()
    (tmp_path / "inc" / "3" / "inc.jaxexport").write_bytes(b"not a jax export")
    failed = wait_for(lambda: versions(url)["failed_versions"], what="version 3 reported")
    assert failed[0]["version"] == 3 and "version 3" in failed[0]["error"]
    body = versions(url)
    assert body["latest_version"] == 2 and [v["version"] for v in body["versions"]] == [2]
    r = requests.post(url + "/model/inc:predict", json={"instances": [{"x": [1.0, 1.0]}]})
    assert r.status_code == 200 and r.json() == {"instances": [{"y": [3.0, 3.0]}]}
    assert requests.get(url + "/ready").status_code == 200
    assert 'mserve_version_loads_total{outcome="failed",servable="inc"} 1.0' in requests.get(url + "/metrics").text

    # Fixing version 3 in place (its files change) gets it loaded.
    (tmp_path / "inc" / "3" / "inc.jaxexport").unlink()
    export_to(tmp_path / "inc" / "3" / "inc.jaxexport", lambda x: x + 3.0, spec("b, 2"))
    wait_for(lambda: [v["version"] for v in versions(url)["versions"]] == [3], what="version 3 after the fix")
    assert versions(url)["failed_versions"] == []

    # Removing versions rolls back: 3 goes, 2 comes back (loaded again), then 3 is unloaded.
    with ClientLoop(url, threads=2) as loop:
        wait_for(lambda: len(loop.answers) > 10, what="traffic")
        shutil.rmtree(tmp_path / "inc" / "3")
        wait_for(lambda: [v["version"] for v in versions(url)["versions"]] == [2], what="rollback to 2")
        seen = len(loop.answers)
        wait_for(lambda: len(loop.answers) > seen + 10, what="traffic on version 2")
    assert loop.failures() == []
    assert loop.answers[-1][1] == {"instances": [{"y": [3.0, 3.0]}]}
    metrics = requests.get(url + "/metrics").text
    assert 'version="3"' not in metrics  # an unloaded version's series are gone
    assert 'mserve_queue_depth{model="inc.jaxexport",servable="inc",version="2"}' in metrics


def test_pinned_version_unloads_when_its_folder_goes(tmp_path, stop_server):
    write_servable(tmp_path, "inc", INC_CONFIG)
    add_version(tmp_path, 1, 1.0)
    add_version(tmp_path, 2, 2.0)
    url = server.start_restful_server("127.0.0.1:0").url
    server.start_servables(server.ServableStartConfig(tmp_path, "inc", version_number=[1, 2]), poll_interval=0.1)
    assert [v["version"] for v in versions(url)["versions"]] == [1, 2]
    add_version(tmp_path, 3, 3.0)  # not asked for: pinned configs do not follow new folders
    shutil.rmtree(tmp_path / "inc" / "1")
    wait_for(lambda: [v["version"] for v in versions(url)["versions"]] == [2], what="version 1 unloaded")
    time.sleep(0.3)
    assert [v["version"] for v in versions(url)["versions"]] == [2]
    shutil.rmtree(tmp_path / "inc" / "2")
    wait_for(lambda: requests.get(url + "/ready").status_code == 503, what="/ready 503 with nothing loaded")
    assert "no version of servable inc" in requests.get(url + "/ready").json()["status"]
    assert requests.post(url + "/model/inc:predict", json={"instances": [{"x": [1.0, 1.0]}]}).status_code == 404


# --------------------------------------------------------------------------- graceful stop


def test_stop_turns_ready_503_first_and_serves_through_the_grace(tmp_path):
    write_servable(tmp_path, "inc", INC_CONFIG)
    add_version(tmp_path, 1, 1.0)
    url = server.start_restful_server("127.0.0.1:0").url
    server.start_servables(server.ServableStartConfig(tmp_path, "inc"))
    stopper = threading.Thread(target=server.stop, kwargs={"drain_timeout": 5, "grace": 1.0})
    stopper.start()
    try:
        (r,) = wait_for(lambda: (r := requests.get(url + "/ready")).status_code == 503 and (r,), what="/ready 503")
        assert r.json()["status"] == "stopping"
        # Still serving during the grace period, on new connections too.
        r = requests.post(url + "/model/inc:predict", json={"instances": [{"x": [1.0, 1.0]}]})
        assert r.status_code == 200
    finally:
        stopper.join(30)
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=2)
