"""The ``mserve`` command line, driven for real.

* ``invoke``/``encode`` run in-process (Typer's CliRunner) against a real server: the
  ``mserve start`` console script, as a subprocess on a free port, started from a temp
  dir where ``mserve new demo`` was run (so ``--servable demo`` is found there and
  ``--servable add`` falls back to the bundled one).
* ``list`` and the load errors of ``start`` run in-process: they load servables
  through the server API (no in-process server is running in this module).
* SIGTERM drains in-flight requests and exits 0, in a subprocess of its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from typer.testing import CliRunner

from mserve.protocol import codec
from mserve.cli.main import app
from mserve.cli.settings import StartSettings
from mserve.cli.render import CliError

from support import REPO, free_port, write_servable

SAMPLES = REPO / "sample_data"
MSERVE = Path(sys.executable).with_name("mserve")
runner = CliRunner()

# Only Python stages: loads fast, and covers bytes/str inputs and outputs and a slow
# request for the drain test.
ECHO_CONFIG = """
    import time
    from pathlib import Path

    import numpy as np

    from mserve import register

    NAPPING = Path(__file__).parent / "napping"  # tells the drain test a request is in flight


    def describe(data, text):
        return np.int32(len(data)), text.upper(), data.tobytes()[::-1]


    def nap(seconds):
        NAPPING.touch()
        time.sleep(float(seconds))
        return seconds


    def fail_on_negative(x):
        if float(x) < 0:
            raise ValueError("negative input")
        return np.zeros((10, 10), np.float32) + x


    @register.register_method(output_names=["size", "upper", "reversed"])
    def inspect(data, text):
        size, upper, reversed_ = register.add_stage(describe, data, text, outputs_count=3)
        return size, upper, reversed_


    @register.register_method(output_names=["slept"])
    def sleep(seconds):
        return register.add_stage(nap, seconds, outputs_count=1)


    @register.register_method(output_names=["y"])
    def big(x):
        return register.add_stage(fail_on_negative, x, outputs_count=1, tag="Preprocess")
"""


def cli(*args: str, env: dict | None = None, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env, input=input)


def mserve_cmd() -> list[str]:
    return [str(MSERVE)] if MSERVE.exists() else [sys.executable, "-m", "mserve.cli"]


class Started:
    """A ``mserve start`` subprocess, its output going to files."""

    def __init__(self, args: list[str], cwd: Path, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.out_path = cwd / f"start-{port}.out"
        self.err_path = cwd / f"start-{port}.err"
        env = {**os.environ, "NO_COLOR": "1"}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [*mserve_cmd(), "start", *args, "--port", str(port)], cwd=cwd, stdout=out, stderr=err, env=env
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_ready(self, timeout: float = 300) -> None:
        # A hang guard, not a timing: loading on a busy 2-core machine running the
        # suite on every core can take minutes.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mserve start exited {self.proc.returncode}:\n{self.stderr}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.1)
                continue
            # Listening; the table is printed (and flushed) once the servables are served.
            while "serving on" not in self.stdout:
                if self.proc.poll() is not None:
                    raise AssertionError(f"mserve start exited {self.proc.returncode}:\n{self.stderr}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"mserve start not serving after {timeout}s:\n{self.stderr}")
                time.sleep(0.05)
            return
        raise AssertionError(f"mserve start not listening after {timeout}s:\n{self.stderr}")

    def stop(self, timeout: float = 120) -> int:  # a hang guard: draining on a busy machine takes time
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A temp dir with ``mserve new demo`` run in it, plus an ``echo`` servable."""
    root = tmp_path_factory.mktemp("cli")
    result = cli("new", "demo", "--dir", root)
    assert result.exit_code == 0, result.output
    write_servable(root, "echo", ECHO_CONFIG)
    (root / "echo" / "1").mkdir()  # no model files: Python stages only
    return root


@pytest.fixture(scope="module")
def served(workdir):
    """``mserve start --servable demo --servable echo --servable add`` from workdir."""
    started = Started(["--servable", "demo", "--servable", "echo", "--servable", "add"], workdir, free_port())
    try:
        started.wait_ready()
    except BaseException:
        started.proc.kill()
        raise
    yield started
    code = started.stop()
    assert code == 0, started.stderr


# --------------------------------------------------------------------------- basics


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == "mserve 0.1.0"


@pytest.mark.parametrize("command", ["start", "invoke", "encode", "new", "list", "completion"])
def test_every_command_has_help_with_examples(command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Usage: mserve " + command in result.stdout
    assert "Examples" in result.stdout
    assert f"mserve {command}" in result.stdout.split("Examples", 1)[1]


def test_help_does_not_import_jax_or_the_server():
    code = (
        "import sys\n"
        "from mserve.cli.main import main\n"
        "sys.argv = ['mserve', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('jax', 'flask', 'mserve.server', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out


def test_completion_script():
    result = cli("completion", "bash")
    assert result.exit_code == 0
    assert "_MSERVE_COMPLETE" in result.stdout and "complete " in result.stdout


def test_errors_go_to_stderr_and_no_color_is_honored():
    colored = cli("encode", "/nonexistent/x.npy", env={"FORCE_COLOR": "1"})
    plain = cli("encode", "/nonexistent/x.npy", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    piped = cli("encode", "/nonexistent/x.npy")
    for result in (colored, plain, piped):
        assert result.exit_code == 2
        assert result.stdout == ""
        assert "cannot read /nonexistent/x.npy" in result.stderr
    assert "\x1b[1;31m" in colored.stderr  # red, when a terminal is forced
    assert not re.search(r"\x1b\[[0-9;]*3[0-9]m", plain.stderr)  # no color codes with NO_COLOR
    assert "\x1b" not in piped.stderr  # not a terminal: no escapes at all


# --------------------------------------------------------------------------- encode


def test_encode_npy_is_the_codec_typed_tensor():
    result = cli("encode", SAMPLES / "add_x1.npy")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1 and " " not in result.stdout.strip()  # compact
    obj = json.loads(result.stdout)
    assert obj == codec.encode_tensor(np.load(SAMPLES / "add_x1.npy"))
    assert obj["type"] == "float32" and obj["shape"] == [2, 2]
    np.testing.assert_array_equal(codec.decode_b64_object(obj), [[1, 2], [3, 4]])


def test_encode_binary_file_as_bytes_and_as_a_typed_tensor(tmp_path):
    blob = tmp_path / "image.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(8)))
    result = cli("encode", blob)
    assert json.loads(result.stdout) == {"b64": base64.b64encode(blob.read_bytes()).decode(), "type": "bytes"}

    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.arange(6, dtype="<i2").tobytes())
    obj = json.loads(cli("encode", raw, "--type", "int16", "--shape", "2,3").stdout)
    assert obj["type"] == "int16" and obj["shape"] == [2, 3]
    np.testing.assert_array_equal(codec.decode_b64_object(obj), np.arange(6).reshape(2, 3))

    bad = cli("encode", raw, "--type", "int16", "--shape", "4,4")
    assert bad.exit_code == 2 and "needs 16 int16 values" in bad.stderr
    unknown = cli("encode", raw, "--type", "complex64")
    assert unknown.exit_code == 2 and "unknown" in unknown.stderr


def test_encode_wraps_instances_and_checks_names():
    result = cli("encode", SAMPLES / "add_x1.npy", SAMPLES / "add_x2.npy", "--name", "x1", "--name", "x2", "--instances")
    body = json.loads(result.stdout)
    assert list(body) == ["instances"] and list(body["instances"][0]) == ["x1", "x2"]
    missing = cli("encode", SAMPLES / "add_x1.npy", "--instances")
    assert missing.exit_code == 2 and "--name" in missing.stderr
    mismatch = cli("encode", SAMPLES / "add_x1.npy", "--name", "x1", "--name", "x2")
    assert mismatch.exit_code == 2 and "one --name per file" in mismatch.stderr


def test_encode_output_posted_to_the_server_gives_the_sum(served):
    result = cli("encode", SAMPLES / "add_x1.npy", SAMPLES / "add_x2.npy", "--name", "x1", "--name", "x2", "--instances")
    reply = requests.post(served.url + "/model/add:add_common", data=result.stdout_bytes, timeout=30)
    assert reply.status_code == 200
    assert reply.json() == {"instances": [{"y": [[6.0, 8.0], [10.0, 12.0]]}]}


def test_encode_piped_into_curl(served):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    encode = subprocess.run(
        [*mserve_cmd(), "encode", SAMPLES / "add_x1.npy", SAMPLES / "add_x2.npy", "--name", "x1", "--name", "x2",
         "--instances"],
        capture_output=True, check=True, timeout=60,
    )
    out = subprocess.run(
        [curl, "-sf", "-d", "@-", served.url + "/model/add:add_common"],
        input=encode.stdout, capture_output=True, check=True, timeout=60,
    )
    assert json.loads(out.stdout) == {"instances": [{"y": [[6.0, 8.0], [10.0, 12.0]]}]}


# --------------------------------------------------------------------------- start (running)


def test_start_prints_the_table_and_one_log_line_per_request(served):
    table = served.stdout
    assert f"{served.url}/model/demo:add" in table
    assert f"{served.url}/model/add:add_common" in table
    assert "x1 float32[2,2]" in table and "x1 float32[2]" in table
    assert f"serving on {served.url}" in table
    requests.post(served.url + "/model/add:add_common", json={"instances": [{"x1": 1}]}, timeout=30)
    deadline = time.monotonic() + 5
    while "POST /model/add:add_common 400" not in served.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"POST /model/add:add_common 400 [0-9.]+ms", served.stderr)


# --------------------------------------------------------------------------- invoke


def test_invoke_json_literals_shows_a_table(served):
    result = cli("invoke", "add:add_common", "-i", "x1=[[1,2],[3,4]]", "-i", "x2=[[5,6],[7,8]]", "--url", served.url)
    # JSON ints are int32 on the wire; add_common declares float32 and the ints convert
    # exactly, so invoke sends them as float32 (tests/test_first_hour.py has the refusals).
    assert result.exit_code == 0, result.output
    assert "[[6.0, 8.0], [10.0, 12.0]]" in result.stdout
    assert "Traceback" not in result.output

    ok = cli("invoke", "add:add_common", "-i", "x1=[[1.0,2.0],[3.0,4.0]]", "-i", "x2=[[5.0,6.0],[7.0,8.0]]",
             "--url", served.url)
    assert ok.exit_code == 0, ok.output
    assert "[[6.0, 8.0], [10.0, 12.0]]" in ok.stdout
    assert ok.stderr == ""


def test_invoke_npy_files_count_and_json(served):
    result = cli(
        "invoke", "add:add_common", "-i", f"x1=@{SAMPLES / 'add_x1.npy'}", "-i", f"x2=@{SAMPLES / 'add_x2.npy'}",
        "-n", "3", "--json", "--url", served.url,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"instances": [{"y": [[6.0, 8.0], [10.0, 12.0]]}] * 3}


def test_invoke_instances_file_version_and_output_dir(served, tmp_path):
    out = tmp_path / "out"
    result = cli(
        "invoke", "add:add_cast", "--instances", SAMPLES / "add_instances.json", "--version", "1",
        "--output", out, "--url", served.url,
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(out / "y_0.npy"), [[6, 8], [10, 12]])
    np.testing.assert_array_equal(np.load(out / "y_1.npy"), [[2, 3], [4, 5]])
    assert "saved 2 file(s)" in result.stderr


def test_invoke_instances_from_stdin(served):
    body = cli("encode", SAMPLES / "add_x1.npy", SAMPLES / "add_x2.npy", "--name", "x1", "--name", "x2", "--instances")
    result = cli("invoke", "add:add_common", "--instances", "-", "--json", "--url", served.url, input=body.stdout)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instances"][0]["y"] == [[6.0, 8.0], [10.0, 12.0]]


def test_invoke_the_scaffolded_servable(served):
    result = cli("invoke", "demo:add", "-i", "x1=[1.0, 2.0]", "-i", "x2=[3.0, 4.0]", "--url", served.url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"instances": [{"y": [4.0, 6.0]}]}
    cast = cli("invoke", "demo:add_any", "-i", "x1=[1, 2]", "-i", "x2=[3, 4]", "--url", served.url, "--json")
    assert json.loads(cast.stdout) == {"instances": [{"y": [4.0, 6.0]}]}


def test_invoke_bytes_and_string_inputs_and_outputs(served, tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01hello")
    out = tmp_path / "saved"
    result = cli("invoke", "echo:inspect", "-i", f"data=@{blob}", "-i", 'text="shout"', "--url", served.url,
                 "--output", out)
    assert result.exit_code == 0, result.output
    assert "SHOUT" in result.stdout and "<7 bytes>" in result.stdout
    assert (out / "reversed_0.bin").read_bytes() == b"olleh\x01\x00"
    assert (out / "upper_0.txt").read_text() == "SHOUT"
    assert np.load(out / "size_0.npy") == 7


def test_invoke_big_tensor_is_summarized(served):
    result = cli("invoke", "echo:big", "-i", "x=1.5", "--url", served.url)
    assert result.exit_code == 0, result.output
    assert "shape [10, 10]" in result.stdout and "mean 1.5" in result.stdout


def test_invoke_partial_failure_exits_1(served, tmp_path):
    instances = tmp_path / "mixed.json"
    instances.write_text(json.dumps([{"x": 1.0}, {"x": -1.0}]))
    result = cli("invoke", "echo:big", "--instances", instances, "--url", served.url)
    assert result.exit_code == 1
    assert "Preprocess Failed" in result.stdout and "negative input" in result.stdout
    assert "1 of 2 instance(s) failed" in result.stderr


@pytest.mark.parametrize(
    ("target", "args", "message"),
    [
        ("add:nope", ["-i", "x1=1"], "method is not available"),
        ("nosuch:add", ["-i", "x1=1"], "servable is not available"),
        ("add:add_common", ["-i", "x1=[[1.0,2.0],[3.0,4.0]]"], "Cannot find input x2"),
        ("add:add_common", ["-i", "x1=[[1.0,2.0],[3.0]]", "-i", "x2=1.0"], "invalid json array"),
        ("add:add_common", ["-i", "x1=[[1.0,2.0],[3.0,4.0]]", "-i", "x2=1.0", "--version", "7"],
         "servable is not available"),
    ],
)
def test_invoke_request_level_errors_exit_2(served, target, args, message):
    result = cli("invoke", target, *args, "--url", served.url)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("error: HTTP 4") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add"], "expected SERVABLE:METHOD"),
        (["add:add_common", "-i", "x1"], "NAME=VALUE"),
        (["add:add_common", "-i", "x1=[1,"], "not a JSON literal"),
        (["add:add_common", "-i", "x1=@/nonexistent.npy"], "cannot read"),
        (["add:add_common"], "no inputs"),
        (["add:add_common", "-i", "x1=1", "--url", "127.0.0.1:5500"], "needs a scheme"),
        (["add:add_common", "-i", "x1=1", "--insecure"], "https:// URLs only"),
    ],
)
def test_invoke_bad_command_lines_exit_2(args, message):
    result = cli("invoke", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_invoke_without_a_server_exits_2():
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("invoke", "add:smile", "-i", "x1=1", "--url", url)
    assert result.exit_code == 2
    assert f"cannot connect to {url}/model/add:smile: connection refused" in result.stderr  # no emoji
    assert "Traceback" not in result.output
    debug = cli("invoke", "add:add_common", "-i", "x1=1", "--url", f"http://127.0.0.1:{free_port()}", "--debug")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr


# --------------------------------------------------------------------------- new / list


def test_new_never_overwrites(workdir):
    before = (workdir / "demo" / "servable_config.py").read_text()
    result = cli("new", "demo", "--dir", workdir)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert (workdir / "demo" / "servable_config.py").read_text() == before
    assert not [p for p in workdir.iterdir() if p.name.startswith(".demo.")]  # no leftovers
    assert cli("new", "bad/name", "--dir", workdir).exit_code == 2


@pytest.mark.parametrize("name, why", [
    ("my-model", "must be a Python identifier"),
    ("json", "the module name 'json' is already taken"),
    ("numpy", "the module name 'numpy' is already taken"),
])
def test_new_refuses_up_front_the_names_the_loader_refuses(tmp_path, name, why):
    """`mserve new` and the loader share one name check: a name `new` accepts loads."""
    result = cli("new", name, "--dir", tmp_path)
    assert result.exit_code == 2 and why in result.stderr, result.output
    assert not list(tmp_path.iterdir())  # nothing written
    (tmp_path / name / "1").mkdir(parents=True)
    (tmp_path / name / "servable_config.py").write_text("from mserve import register\n")
    from mserve import server
    from mserve.errors import ServableLoadError

    with pytest.raises(ServableLoadError, match=re.escape(why)):
        server.start_servables(server.ServableStartConfig(str(tmp_path), name))


def test_new_prints_how_to_try_it(tmp_path):
    result = cli("new", "demo2", "--dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert f"mserve start {tmp_path} --servable demo2" in result.stdout
    assert "mserve invoke demo2:add -i x1='[1.0, 2.0]' -i x2='[3.0, 4.0]'" in result.stdout
    files = {p.relative_to(tmp_path / "demo2").as_posix() for p in (tmp_path / "demo2").rglob("*") if p.is_file()}
    assert files == {"servable_config.py", "export_model.py", "README.md", "1/model.jaxexport"}
    assert "mserve invoke demo2:add" in (tmp_path / "demo2" / "README.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "demo2").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_new_jax_function_template_loads_and_lists(tmp_path):
    result = cli("new", "clf", "--dir", tmp_path, "--template", "jax-function")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "clf" / "1" / "weights.npz").is_file()
    listed = cli("list", tmp_path, "--json")
    assert listed.exit_code == 0, listed.output
    (servable,) = json.loads(listed.stdout)["servables"]
    method = servable["versions"][0]["methods"][0]
    assert (servable["name"], method["name"]) == ("clf", "predict")
    assert method["inputs"] == [{"name": "x", "dtype": "float32", "shape": [4]}]
    assert [o["name"] for o in method["outputs"]] == ["probs", "label"]


def test_list_bundled_table():
    result = cli("list", "--servable", "add")
    assert result.exit_code == 0, result.output
    assert "/model/add:add_common" in result.stdout and "x1 float32[2,2]" in result.stdout


def test_list_and_start_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("list", "start"):
        result = cli(command, empty)
        assert result.exit_code == 2 and "no servables in" in result.stderr
    write_servable(tmp_path / "broken", "bad", "from mserve import register\nraise ValueError('boom')\n")
    for command in ("list", "start"):
        result = cli(command, tmp_path / "broken")
        assert result.exit_code == 1
        assert "servable_config.py raised ValueError: boom" in result.stderr
        assert "Traceback" not in result.output
    missing = cli("start", tmp_path / "broken", "--servable", "other")
    assert missing.exit_code == 2 and "'other' not found" in missing.stderr
    bad_version = cli("start", "--servable", "add:x")
    assert bad_version.exit_code == 2 and "not a number" in bad_version.stderr


def test_start_config_file_and_flags(tmp_path):
    config = tmp_path / "mserve.yaml"
    config.write_text("servable_directory: servables\nport: 6001\ndevice-ids: 0,1\nthreads: 4\nservables: [add]\n")
    settings = StartSettings.build(config, {"port": 7000, "servables": None, "host": None})
    assert settings.port == 7000  # the flag wins
    assert settings.threads == 4 and settings.device_ids == [0, 1] and settings.servables == ["add"]
    assert settings.servable_directory == str(tmp_path / "servables")  # relative to the file
    assert settings.address == "127.0.0.1:7000"
    assert settings.restful_options()["inline_max_ms"] == 1.0
    config.write_text("inline_max_ms: 0\n")
    assert StartSettings.build(config, {}).restful_options()["inline_max_ms"] == 0
    assert StartSettings.build(config, {"inline_max_ms": 2.5}).restful_options()["inline_max_ms"] == 2.5
    with pytest.raises(CliError, match="inline_max_ms must be >= 0"):
        StartSettings.build(None, {"inline_max_ms": -1.0})

    config.write_text("prot: 1\n")
    result = cli("start", "--config", config)
    assert result.exit_code == 2 and "unknown setting 'prot'" in result.stderr
    config.write_text("port: fast\n")
    result = cli("start", "--config", config)
    assert result.exit_code == 2 and "port must be an integer" in result.stderr
    with pytest.raises(CliError, match="both --ssl-certfile and --ssl-keyfile"):
        StartSettings.build(None, {"ssl_certfile": "cert.pem"})


def test_start_port_in_use_exits_1(served):
    result = cli("start", "--servable", "add", "--port", served.port)
    assert result.exit_code == 1
    assert "cannot listen" in result.stderr


# --------------------------------------------------------------------------- signals


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(workdir):
    started = Started(["--servable", "echo"], workdir, free_port())
    try:
        started.wait_ready()
        replies: list = []
        thread = threading.Thread(
            target=lambda: replies.append(
                requests.post(started.url + "/model/echo:sleep", json={"instances": [{"seconds": 1.0}]}, timeout=30)
            )
        )
        marker = workdir / "echo" / "napping"
        marker.unlink(missing_ok=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:  # in flight before the signal
            time.sleep(0.02)
        assert marker.exists()
        code = started.stop()
        thread.join(10)
    finally:
        if started.proc.poll() is None:
            started.proc.kill()
    assert code == 0, started.stderr
    assert replies and replies[0].status_code == 200 and replies[0].json() == {"instances": [{"slept": 1.0}]}
    assert "SIGTERM: stopping" in started.stderr
    assert "POST /model/echo:sleep 200" in started.stderr


# --------------------------------------------------------------------------- https


def test_https_invoke(workdir, tmp_path):
    pytest.importorskip("mserve.transport.https", reason="HTTPS transport (mserve.transport.https) not there yet")
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example")
    files = {
        "ca.pem": ca.cert_pem,
        "server.pem": server_cert.cert_chain_pems[0],
        "server.key": server_cert.private_key_pem,
        "client.pem": client_cert.private_key_and_cert_chain_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / name))
    port = free_port()
    started = Started(
        ["--servable", "echo", "--ssl-certfile", str(tmp_path / "server.pem"), "--ssl-keyfile",
         str(tmp_path / "server.key"), "--ssl-ca", str(tmp_path / "ca.pem"), "--verify-client"],
        workdir, port,
    )
    try:
        started.wait_ready()
        url = f"https://127.0.0.1:{port}"
        assert url in started.stdout
        args = ["invoke", "echo:sleep", "-i", "seconds=0", "--url", url, "--json"]
        ok = cli(*args, "--cacert", tmp_path / "ca.pem", "--cert", tmp_path / "client.pem")
        assert ok.exit_code == 0, ok.output
        assert json.loads(ok.stdout) == {"instances": [{"slept": 0}]}
        untrusted = cli(*args, "--cert", tmp_path / "client.pem")
        assert untrusted.exit_code == 2 and "TLS verification" in untrusted.stderr
        no_client_cert = cli(*args, "--cacert", tmp_path / "ca.pem")
        assert no_client_cert.exit_code == 2
    finally:
        assert started.stop() == 0
