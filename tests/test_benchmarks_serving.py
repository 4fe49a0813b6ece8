"""The benchmark scripts that start whole servers (front-end and device processes,
TLS, floods, a stop under load), run at their tiny size: see tests/test_benchmarks.py,
whose `test_every_script_is_covered` counts this table too. A file of its own so that
xdist (``--dist loadfile``) runs it beside the other half on another worker.
"""

from __future__ import annotations

import pytest

from test_benchmarks import run_tiny

pytestmark = pytest.mark.timeout(600)

# script -> (tiny arguments, a line its report must contain)
SERVING = {
    "bench_serving.py": (["--tiny"], "CPU µs/req"),
    "bench_tls.py": (["-d", "0.5", "--passes", "1", "-c", "4"], "HTTPS/HTTP throughput ratio"),
    "bench_soak.py": (["--minutes", "0.05", "--sample", "1", "--flood-every", "2", "--flood-size", "5"], "RSS"),
    "bench_faults.py": (["--tiny"], "requests lost at stop: 0"),  # exits 1 if any is lost
    "bench_distributed.py": (["--tiny", "--hosts", "2"], "sharded over 2 agent processes"),
}


@pytest.mark.parametrize("script", sorted(SERVING))
def test_serving_benchmark_runs_at_tiny_size(script):
    args, expected = SERVING[script]
    report = run_tiny(script, args)
    assert expected in report, report[-3000:]
