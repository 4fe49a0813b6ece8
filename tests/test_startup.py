"""`mserve start` tells the truth while it starts and stops: ``ready`` is printed once,
when ``/ready`` answers 200 (not when the device process has compiled while the
front-ends still load for seconds), every log line of every process has one format,
no spurious warnings appear, and Ctrl+C (SIGINT to the whole foreground process
group, as a terminal sends it) stops cleanly without a device process being
"restarted" on the way out.

The real default server: front-end processes and a device process, the bundled
servables, on a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import requests

from support import free_port
from test_cli import mserve_cmd

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) mserve[\w.]*( \[[^\]]+\])?: ")
ACCESS_LINE = re.compile(r"^\d\d:\d\d:\d\d (GET|POST) /")
CLI_NOTES = ("listening on ", "ready: ", "SIGINT: ", "SIGTERM: ", "stopped")
READY_LINE = "ready: every servable is loaded and served"


def _ready_statuses(url: str, tries: int = 6) -> set[int]:
    """/ready over fresh connections, which the kernel spreads over the front-ends."""
    statuses = set()
    for _ in range(tries):
        with requests.Session() as session:
            statuses.add(session.get(f"{url}/ready", timeout=30).status_code)
    return statuses


def test_start_says_ready_when_ready_answers_200_in_one_format_and_stops_clean(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err, open(tmp_path / "stdout.txt", "wb") as out:
        # Its own session: SIGINT to its process group is what Ctrl+C on a terminal sends.
        proc = subprocess.Popen([*mserve_cmd(), "start", "--port", str(port), "--workers", "2"], stdout=out,
                                stderr=err, env={**os.environ, "NO_COLOR": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while READY_LINE not in err_path.read_text():
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        assert _ready_statuses(url) == {200}, err_path.read_text()
        before_ready = err_path.read_text().split(READY_LINE)[0]
        assert "loaded and warm" not in before_ready  # no servable claimed ready before it was
        assert requests.post(f"{url}/model/add:add_common", json={"instances": [
            {"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}, timeout=30).status_code == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(120)
    text = err_path.read_text()
    assert code == 0, text
    assert "starting a new one" not in text and "Traceback" not in text, text
    assert "Task queue depth" not in text, text
    for line in text.splitlines():
        if line.strip():
            assert LOG_LINE.match(line) or ACCESS_LINE.match(line) or line.startswith(CLI_NOTES), (
                f"a line in another format: {line!r}\n{text}")
    assert text.count(READY_LINE) == 1
    # Each servable version says once that it is loaded (one line, not one per logger).
    assert text.count("servable add version 1 ready: ") == 1 and "loaded servable" not in text, text


SLOW = """
    import time
    from mserve import register

    def nap(x):
        time.sleep(0.3)
        return x

    @register.register_method(output_names=["y"])
    def slow(x):
        return register.add_stage(nap, x, outputs_count=1)
"""


def test_requests_waiting_for_a_thread_log_no_queue_depth_warning(tmp_path, caplog):
    """Waitress warns "Task queue depth is N" whenever a request waits for a thread;
    mserve bounds and measures the wait itself, so the warning is noise."""
    import logging
    import threading

    from mserve import server
    from support import serving, write_servable

    write_servable(tmp_path, "slow", SLOW, {"1/README": b"Python stages only\n"})
    with caplog.at_level(logging.WARNING), serving(server.ServableStartConfig(str(tmp_path), "slow"),
                                                   threads=1, inline_max_ms=0) as url:
        replies: list[int] = []

        def call() -> None:
            replies.append(requests.post(f"{url}/model/slow:slow", json={"instances": [{"x": 1.5}]},
                                         timeout=60).status_code)

        callers = [threading.Thread(target=call) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
    assert replies == [200] * 4
    assert not [r for r in caplog.records if r.name.startswith("waitress")], caplog.text


START_SCRIPT = """
import os
import sys
from mserve import server


def start():
    servable_dir = sys.argv[1]
    config = server.ServableStartConfig(servable_directory=servable_dir, servable_name="add", device_ids=0)
    server.start_servables(servable_configs=config)
    server.start_restful_server(address="127.0.0.1:" + sys.argv[2])


if __name__ == "__main__":
    start()
"""


def _run_start_script(tmp_path, env: dict[str, str]) -> tuple[str, str]:
    """A MindSpore-style start script, as a user runs it; its stderr once it serves."""
    import sys

    from support import BUNDLED

    script = tmp_path / "serving_server.py"
    script.write_text(START_SCRIPT)
    port = free_port()
    err_path = tmp_path / f"script-{port}.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(BUNDLED), str(port)], stderr=err,
                                stdout=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, err_path.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        time.sleep(0.5)  # the ready line is written right after the server listens
        return err_path.read_text(), f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, err_path.read_text()


def test_a_start_script_logs_where_it_listens_and_when_it_is_ready(tmp_path):
    text, url = _run_start_script(tmp_path, {"MSERVE_PROCESSES": "single"})
    assert re.search(rf"^\d\d:\d\d:\d\d INFO mserve.server: RESTful server listening on {url}$", text, re.M), text
    assert re.search(rf"^\d\d:\d\d:\d\d INFO mserve.server: ready: serving add on {url}$", text, re.M), text


def test_mserve_log_level_quiets_a_start_script(tmp_path):
    text, _ = _run_start_script(tmp_path, {"MSERVE_PROCESSES": "single", "MSERVE_LOG_LEVEL": "warning"})
    assert "listening" not in text and "ready" not in text, text
