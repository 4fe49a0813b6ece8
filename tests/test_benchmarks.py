"""Every script under benchmarks/ runs, at its smallest size, so that none can rot.

Each is run as a user runs it (a subprocess, its own command line) with its tiny-size
flags, and must exit 0 with its report's header; what is measured is not judged (on
a shared machine numbers are noise at this size). ``gpu_check.py`` needs a GPU: here
it must say there is none and stop. A new script under benchmarks/ fails
`test_every_script_is_covered` until it is added to `TINY`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Each script starts JAX (and most, servers of their own): seconds each at these sizes.
# The scripts that start whole servers are in tests/test_benchmarks_serving.py, so that
# xdist's loadfile puts the two halves on different workers.
pytestmark = pytest.mark.timeout(600)

# script -> (tiny arguments, a line its report must contain)
TINY = {
    "bench_channel.py": (["--seconds", "0.2"], "round trip"),
    "bench_predict_path.py": (["--calls", "20"], "add predict, called directly"),
    "bench_grpc.py": (["--tiny"], "Predict handler alone"),
    "bench_backends.py": (["--seconds", "0.1"], "4 simulated CPU devices"),
    "bench_v2.py": (["--tiny"], "CPU us/req"),  # MLServer too where its virtualenv is (see the script)
}
HELPERS = {"proc_cpu.py", "cost_compare.py"}  # modules the scripts import, run through them
NEEDS_WRK = {"bench_serving.py", "bench_tls.py"}


def run_tiny(script: str, args: list[str]) -> str:
    """Run one script as a user does, at its tiny size; it must exit 0. Returns its report."""
    if script in NEEDS_WRK and not shutil.which("wrk"):
        pytest.skip("wrk is not installed (apt-get install -y wrk)")
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=500, cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stdout[-2000:] + "\n" + done.stderr[-3000:]
    return done.stdout


def test_every_script_is_covered():
    from test_benchmarks_serving import SERVING

    assert not set(TINY) & set(SERVING)
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts - HELPERS - {"gpu_check.py"} == set(TINY) | set(SERVING)


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_at_tiny_size(script):
    args, expected = TINY[script]
    report = run_tiny(script, args)
    assert expected in report, report[-3000:]


def test_gpu_check_stops_without_a_gpu():
    probe = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices('gpu')))"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("a GPU is visible here: run benchmarks/gpu_check.py itself")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--seconds", "0.1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "no GPU visible to JAX here" in done.stderr
