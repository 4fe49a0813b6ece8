"""A new user's first hour, driven for real: `mserve start` as a subprocess on a free
port, the CLI against it, HTTP(S) with trustme certificates.

* invoke fits literals and .npy data to the declared dtypes (exactly, or refuses
  naming the input, the expected and the given dtype); --output keeps the dtype;
* start-up: the port listens before loading (/health 200, /ready and predicts 503 +
  Retry-After while a servable loads), progress while compiling, a port in use or a
  bad certificate reported before any servable is even read, probe lines at debug,
  each model's backend and devices logged;
* errors that say what to do: 404s list what is served and the nearest name (the
  client's name cut short), dtype errors name the input, a missing client
  certificate says --cert;
* GET / and GET /docs, `mserve list --url`, the plain-HTTP health port under
  mutual TLS.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from mserve import server
from mserve.serving import progress as load_progress

from support import BUNDLED, REPO, free_port, serving, write_servable
from test_cli import Started, cli, mserve_cmd

SAMPLES = REPO / "sample_data"

# A servable whose servable_config.py waits until the test creates ``release``: the
# server is then "loading" for as long as the test needs, with no timing guesses.
GATE_CONFIG = """
    import time
    from pathlib import Path

    from mserve import register

    HERE = Path(__file__).parent
    (HERE / "entered").touch()
    deadline = time.monotonic() + 60
    while not (HERE / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


    def double(x):
        return x * 2


    @register.register_method(output_names=["y"])
    def twice(x):
        return register.add_stage(double, x, outputs_count=1)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    write_servable(root, "gate", GATE_CONFIG)
    (root / "gate" / "1").mkdir()
    return root


@pytest.fixture(scope="module")
def served(workdir):
    """``mserve start --servable add --servable lenet`` (the bundled ones)."""
    started = Started(["--servable", "add", "--servable", "lenet"], workdir, free_port())
    try:
        started.wait_ready()
    except BaseException:
        started.proc.kill()
        raise
    yield started
    assert started.stop() == 0, started.stderr


def _post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30)


# --------------------------------------------------------------------------- invoke


def test_invoke_converts_int_literals_to_the_declared_float32(served):
    result = cli("invoke", "add:add_common", "-i", "x1=[[1,2],[3,4]]", "-i", "x2=[[1,2],[3,4]]",
                 "--url", served.url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
    mixed = cli("invoke", "add:add_common", "-i", "x1=[[1.5,2],[3,4]]", "-i", "x2=[[1,2],[3,4]]",
                "--url", served.url, "--json")
    assert mixed.exit_code == 0, mixed.output
    assert json.loads(mixed.stdout)["instances"][0]["y"] == [[2.5, 4.0], [6.0, 8.0]]


def test_invoke_refuses_a_conversion_that_is_not_exact(served, tmp_path):
    result = cli("invoke", "add:add_common", "-i", "x1=[[16777217,2],[3,4]]", "-i", "x2=[[1,2],[3,4]]",
                 "--url", served.url)
    assert result.exit_code == 2
    assert "input 'x1' expects float32" in result.stderr
    assert "expected float32, given int32" in result.stderr
    wide = tmp_path / "wide.npy"
    np.save(wide, np.array([[0.1, 2.0], [3.0, 4.0]]))
    as_ints = tmp_path / "ints.npy"
    np.save(as_ints, np.array([[1, 2], [3, 4]], np.int64))
    refused = cli("invoke", "add:add_common", "-i", f"x1=@{wide}", "-i", f"x2=@{as_ints}", "--url", served.url)
    assert refused.exit_code == 2
    assert "input 'x1' expects float32" in refused.stderr and "given float64" in refused.stderr
    assert "astype('float32')" in refused.stderr
    converted = cli("invoke", "add:add_common", "-i", f"x1=@{as_ints}", "-i", f"x2=@{as_ints}",
                    "--url", served.url, "--json")
    assert converted.exit_code == 0, converted.output
    assert json.loads(converted.stdout)["instances"][0]["y"] == [[2.0, 4.0], [6.0, 8.0]]


def test_invoke_output_keeps_the_declared_dtype(served, tmp_path):
    result = cli("invoke", "add:add_common", "-i", f"x1=@{SAMPLES / 'add_x1.npy'}", "-i",
                 f"x2=@{SAMPLES / 'add_x2.npy'}", "--url", served.url, "--output", tmp_path)
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "y_0.npy")
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved, [[6.0, 8.0], [10.0, 12.0]])


def test_invoke_help_examples_send_floats_to_float32_inputs():
    text = cli("invoke", "--help").stdout
    assert "add_common -i x1='[[1,2]" not in text and "demo:predict -i x='[1,2" not in text
    assert "--cert client.pem" in text


def test_server_dtype_error_names_the_input(served):
    r = _post(served.url, "/model/add:add_common", {"instances": [{"x1": [[1, 2], [3, 4]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]})
    assert r.status_code == 400
    message = r.json()["error_msg"]
    assert message.startswith("Given model input 0 data type kMSI_Int32 not match the data type kMSI_Float32 defined in model")
    # Only what add_common feeds the model: add_cast, sharing the model, is not this request's business.
    assert "input 'x1'" in message, message
    assert "add_cast" not in message and "add_trans_datatype" not in message
    r = _post(served.url, "/model/add:add_common", {"instances": [{"x1": [1.0, 2.0], "x2": [[1.0, 2.0], [3.0, 4.0]]}]})
    assert r.json()["error_msg"].startswith("Given model input 0 size 8 not match the size 16 defined in model")
    assert "input 'x1'" in r.json()["error_msg"]


# --------------------------------------------------------------------------- 404s


def test_unknown_names_list_what_is_served_and_the_nearest(served):
    r = _post(served.url, "/model/ad:add_common", {"instances": [{"x1": 1.0}]})
    assert r.status_code == 404
    message = r.json()["error_msg"]
    assert message.startswith("Request servable(ad) method(add_common) , servable is not available")
    assert "served: add, lenet" in message and "did you mean 'add'?" in message
    r = _post(served.url, "/model/add:add_comon", {"instances": [{"x1": 1.0}]})
    assert "method is not available; servable add has method(s) add_common, add_cast" in r.json()["error_msg"]
    assert "did you mean 'add_common'?" in r.json()["error_msg"]
    r = _post(served.url, "/model/add/version/9:add_common", {"instances": [{"x1": 1.0}]})
    assert "servable add serves version(s) 1" in r.json()["error_msg"]
    meta = requests.get(served.url + "/model/lenett", timeout=10)
    assert meta.status_code == 404 and "did you mean 'lenet'?" in meta.json()["error_msg"]
    cli_result = cli("invoke", "lenett:predict", "-i", "image=1", "--url", served.url)
    assert cli_result.exit_code == 2 and "did you mean 'lenet'?" in cli_result.stderr


def test_a_long_unknown_name_is_not_echoed_whole(served):
    name = "x" * 5000
    r = _post(served.url, f"/model/{name}:{name}", {"instances": [{"x1": 1.0}]})
    assert r.status_code == 404
    message = r.json()["error_msg"]
    assert len(message) < 400 and "x" * 64 + "..." in message


# --------------------------------------------------------------------------- browsable API


def test_index_lists_the_methods_and_links(served):
    r = requests.get(served.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    index = r.json()
    urls = {m["url"] for m in index["methods"]}
    assert {"/model/add:add_common", "/model/add:add_cast", "/model/lenet:predict"} <= urls
    assert index["links"]["docs"] == "/docs" and index["links"]["metrics"] == "/metrics"
    for link in index["links"].values():
        assert requests.get(served.url + link, timeout=10).status_code in (200, 503), link
    browser = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    page = requests.get(served.url + "/", headers=browser, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "POST /model/lenet:predict" in page.text and 'href="/docs"' in page.text
    assert requests.post(served.url + "/", json={}, timeout=10).status_code == 400  # POST is still a predict


def test_docs_page_and_its_assets_are_served_locally(served):
    page = requests.get(served.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "/openapi.json" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = requests.get(served.url + "/docs/" + asset, timeout=10)
        assert r.status_code == 200 and len(r.content) > 10_000, asset
    assert requests.get(served.url + "/docs/secrets.py", timeout=10).status_code == 404
    assert requests.get(served.url + "/docs/", timeout=10).url == served.url + "/docs"
    paths = requests.get(served.url + "/openapi.json", timeout=10).json()["paths"]
    assert "get" in paths["/"] and "get" in paths["/docs"]
    assert requests.get(served.url + "/docs/..%2fserver.py", timeout=10).status_code in (404, 405)


def test_list_url_describes_a_running_server(served):
    result = cli("list", "--url", served.url)
    assert result.exit_code == 0, result.output
    assert f"{served.url}/model/add:add_common" in result.stdout and "x1 float32[2,2]" in result.stdout
    as_json = cli("list", "--url", served.url, "--json", "--servable", "lenet")
    assert [s["name"] for s in json.loads(as_json.stdout)["servables"]] == ["lenet"]
    missing = cli("list", "--url", served.url, "--servable", "nope")
    assert missing.exit_code == 2 and "does not serve nope" in missing.stderr
    down = cli("list", "--url", f"http://127.0.0.1:{free_port()}")
    assert down.exit_code == 2 and "connection refused" in down.stderr


def test_each_loaded_model_logs_its_backend_and_devices(served):
    assert "servable lenet version 1: model lenet.jaxexport on backend jax_export, device(s) cpu:0" in served.stderr


def test_plain_progress_lines_when_not_a_terminal(served):
    assert "servable lenet version 1: compiling lenet.jaxexport for batch size 32 (bucket 6 of 6)" in served.stderr
    assert "listening on " + served.url in served.stderr


# --------------------------------------------------------------------------- start-up


def test_listens_while_loading_health_200_ready_and_predicts_503(workdir):
    gate = workdir / "gate"
    for marker in ("entered", "release"):
        (gate / marker).unlink(missing_ok=True)
    started = Started(["--servable", "gate"], workdir, free_port())
    try:
        deadline = time.monotonic() + 60
        while not (gate / "entered").exists() and time.monotonic() < deadline:
            assert started.proc.poll() is None, started.stderr
            time.sleep(0.05)
        assert (gate / "entered").exists()  # loading, and held there by the gate
        health = requests.get(started.url + "/health", timeout=10)
        ready = requests.get(started.url + "/ready", timeout=10)
        predict = _post(started.url, "/model/gate:twice", {"instances": [{"x": 1.0}]})
        assert health.status_code == 200
        assert ready.status_code == 503 and ready.headers["Retry-After"] == "1"
        assert ready.json()["status"] == "loading servables"
        assert predict.status_code == 503 and predict.headers["Retry-After"] == "1"
        (gate / "release").touch()
        started.wait_ready()
        assert requests.get(started.url + "/ready", timeout=10).status_code == 200
        assert _post(started.url, "/model/gate:twice", {"instances": [{"x": 2.0}]}).json() == {"instances": [{"y": 4.0}]}
    finally:
        (gate / "release").touch()
        if started.proc.poll() is None:
            assert started.stop() == 0, started.stderr


def test_port_in_use_is_reported_before_any_servable_is_read(workdir):
    gate = workdir / "gate"
    (gate / "entered").unlink(missing_ok=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*mserve_cmd(), "start", "--servable", "gate", "--port", str(port)], cwd=workdir,
                                capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (gate / "entered").exists()  # servable_config.py never ran


def test_bad_certificate_is_reported_before_any_servable_is_read(workdir, tmp_path):
    gate = workdir / "gate"
    (gate / "entered").unlink(missing_ok=True)
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    result = subprocess.run(
        [*mserve_cmd(), "start", "--servable", "gate", "--port", str(free_port()), "--ssl-certfile",
         str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem")],
        cwd=workdir, capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 1
    assert "cert.pem" in result.stderr and "failed" in result.stderr
    assert not (gate / "entered").exists()


def test_log_level_debug_shows_probe_lines(workdir):
    (workdir / "gate" / "release").touch()
    started = Started(["--servable", "gate", "--log-level", "debug"], workdir, free_port())
    try:
        started.wait_ready()
        requests.get(started.url + "/health", timeout=10)
        requests.get(started.url + "/ready", timeout=10)
        deadline = time.monotonic() + 10
        while "GET /ready 200" not in started.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "GET /health 200" in started.stderr and "GET /ready 200" in started.stderr
    finally:
        assert started.stop() == 0, started.stderr


def test_progress_is_a_rich_display_on_a_terminal(workdir):
    """On a terminal: no plain per-bucket log lines, rich's live display instead."""
    (workdir / "gate" / "release").touch()
    port = free_port()
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*mserve_cmd(), "start", "--servable", "lenet", "--port", str(port)], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 90
        while "compiled lenet version 1" not in _plain(seen) and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen += os.read(leader, 65536)
            except OSError:
                break
    finally:
        proc.terminate()
        proc.wait(30)
        os.close(leader)
    text = seen.decode("utf-8", "replace")
    assert "\x1b[" in text  # a live display (cursor control, colors), not plain lines
    plain = _plain(seen)
    assert "compiled lenet version 1" in plain
    assert "INFO mserve.load" not in plain
    # The device process's log lines are printed above the display, each on a line
    # of its own (rich clears the display's line first), never spliced into it.
    device_lines = [m.start() for m in re.finditer(r"\d\d:\d\d:\d\d INFO \S+ \[device ", text)]
    assert device_lines, plain
    spliced = [text[max(0, i - 60):i + 40] for i in device_lines if not text[:i].endswith(("\n", "\x1b[2K"))]
    assert not spliced, spliced


def _plain(raw: bytes) -> str:
    """Terminal output without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode("utf-8", "replace"))


def test_the_display_shows_bucket_k_of_n(monkeypatch):
    from rich.console import Console

    from mserve.cli import progress as cli_progress, render

    buffer = io.StringIO()
    monkeypatch.setattr(render, "err", lambda: Console(file=buffer, force_terminal=True, width=120))
    with cli_progress.LoadDisplay() as display:
        load_progress.report(load_progress.LoadProgress("lenet", 1, "loading", "lenet.jaxexport", "jax_export", ("cpu:0",)))
        load_progress.report(load_progress.LoadProgress("lenet", 1, "compiling", "lenet.jaxexport", step=3, total=6,
                                                        batch_size=4))
        display._progress.refresh()
        shown = buffer.getvalue()
    assert "lenet" in shown and "compiling lenet.jaxexport" in shown and "bucket 3 of 6" in shown


def test_loading_reports_every_compiled_bucket():
    events: list = []
    with load_progress.listening(events.append):
        with serving(server.ServableStartConfig(BUNDLED, "lenet", max_batch_size=8)):
            pass
    phases = [(e.phase, e.step, e.total, e.batch_size) for e in events if e.servable == "lenet"]
    assert phases[0][0] == "loading" and phases[-1][0] == "ready"
    assert [p for p in phases if p[0] == "compiling"] == [("compiling", k + 1, 4, size) for k, size in
                                                           enumerate([1, 2, 4, 8])]
    loading = next(e for e in events if e.phase == "loading")
    assert loading.backend == "jax_export" and loading.devices == ("cpu:0",)


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def mtls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("mtls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.crt"))
    srv = ca.issue_cert("localhost", "127.0.0.1")
    srv.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    srv.private_key_pem.write_to_path(str(root / "server.key"))
    ca.issue_cert("client@example").private_key_and_cert_chain_pem.write_to_path(str(root / "client.pem"))
    return root


def test_mutual_tls_health_port_and_the_cert_hint(workdir, mtls_files):
    health_port = free_port()
    started = Started(
        ["--servable", "add", "--ssl-certfile", mtls_files / "server.crt", "--ssl-keyfile", mtls_files / "server.key",
         "--ssl-ca", mtls_files / "ca.crt", "--verify-client", "--health-port", str(health_port)],
        workdir, free_port(),
    )
    try:
        started.wait_ready()
        url = f"https://127.0.0.1:{started.port}"
        probes = f"http://127.0.0.1:{health_port}"
        assert requests.get(probes + "/health", timeout=10).json() == {"status": "ok"}
        ready = requests.get(probes + "/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert requests.post(probes + "/model/add:add_common", json={}, timeout=10).status_code == 404
        assert requests.get(probes + "/models", timeout=10).status_code == 404
        assert f"{probes}/ready" in started.stdout
        with pytest.raises(requests.exceptions.SSLError):  # the main port still wants a certificate
            requests.get(url + "/ready", verify=str(mtls_files / "ca.crt"), timeout=10)

        args = ["invoke", "add:add_common", "-i", "x1=[[1,2],[3,4]]", "-i", "x2=[[1,2],[3,4]]", "--url", url,
                "--cacert", mtls_files / "ca.crt"]
        no_cert = cli(*args)
        assert no_cert.exit_code == 2
        assert "requires a client certificate" in no_cert.stderr and "pass --cert" in no_cert.stderr
        ok = cli(*args, "--cert", mtls_files / "client.pem", "--json")
        assert ok.exit_code == 0, ok.output
        assert json.loads(ok.stdout) == {"instances": [{"y": [[2.0, 4.0], [6.0, 8.0]]}]}
    finally:
        assert started.stop() == 0, started.stderr


def test_health_port_checks(tmp_path):
    result = cli("start", "--servable", "add", "--port", "5999", "--health-port", "5999")
    assert result.exit_code == 2 and "is the serving port" in result.stderr
    result = cli("start", "--servable", "add", "--health-port", "70000")
    assert result.exit_code == 2 and "out of range" in result.stderr
