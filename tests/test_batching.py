"""Cross-request batching, limits and devices, against a real server.

Timing is never asserted; what is observed is who shared a device call (the
batcher's batch-size counter), which results came back to whom, and the
compilation counter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from mserve import server
from support import BUNDLED, REPO, export_to, serving, spec, write_servable

CONFIG = """
    import time
    from mserve import register

    model = register.declare_model("affine.jaxexport", "jax_export", with_batch_dim=True)

    def slow(x, seconds):
        time.sleep(float(seconds))
        return x

    @register.register_method(output_names=["y"])
    def affine(x):
        return register.add_stage(model, x, outputs_count=1)

    @register.register_method(output_names=["y"])
    def slow_affine(x, seconds):
        x = register.add_stage(slow, x, seconds, outputs_count=1, tag="Slow")
        return register.add_stage(model, x, outputs_count=1)
"""


def affine(x):
    return x * 2.0 + 1.0


@pytest.fixture(scope="module")
def servable_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    artifact = export_to(root / "affine.jaxexport", affine, spec("b, 3"))
    write_servable(root, "affine", CONFIG, {"1/affine.jaxexport": artifact})
    return root


def _batcher():
    return server.registry().servables()["affine"].versions[1].batchers[0]


def _post(url, instances, method="affine"):
    return requests.post(f"{url}/model/affine:{method}", json={"instances": instances}, timeout=30)


@pytest.fixture(scope="module")
def batched(servable_dir):
    config = server.ServableStartConfig(servable_dir, "affine", max_batch_size=8, max_batch_delay_ms=50)
    with serving(config) as url:
        yield url


def test_concurrent_requests_share_a_device_call(batched):
    batcher = _batcher()
    batcher.batch_sizes.clear()
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        return _post(batched, [{"x": [float(i)] * 3}]).json()

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(8)))
    for i, reply in enumerate(replies):
        assert reply == {"instances": [{"y": [2.0 * i + 1.0] * 3}]}
    assert max(batcher.batch_sizes) > 1, batcher.batch_sizes
    assert sum(n * c for n, c in batcher.batch_sizes.items()) == 8


def test_results_never_mix_between_requests(batched):
    rng = np.random.default_rng(0)

    def client(seed):
        local = np.random.default_rng(seed)
        bad = 0
        for _ in range(15):
            n = int(local.integers(1, 4))
            x = local.normal(size=(n, 3)).astype(np.float32)
            reply = _post(batched, [{"x": row.tolist()} for row in x]).json()
            got = np.array([inst["y"] for inst in reply["instances"]], np.float32)
            bad += not np.allclose(got, affine(x), rtol=1e-6)
        return bad

    with ThreadPoolExecutor(12) as pool:
        assert sum(pool.map(client, rng.integers(0, 1 << 30, 12))) == 0
    assert max(_batcher().batch_sizes) > 1


def test_request_larger_than_max_batch_is_split(batched):
    batcher = _batcher()
    batcher.batch_sizes.clear()
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    reply = _post(batched, [{"x": row.tolist()} for row in x]).json()
    assert np.array_equal(np.array([i["y"] for i in reply["instances"]], np.float32), affine(x))
    assert max(batcher.batch_sizes) == 8
    assert sum(n * c for n, c in batcher.batch_sizes.items()) == 20


def test_one_bad_instance_does_not_fail_its_batch(batched):
    reply = _post(batched, [{"x": [1.0, 1.0, 1.0]}, {"x": [1, 2, 3]}, {"x": [0.0, 0.0, 0.0]}]).json()
    assert reply["instances"][0] == {"y": [3.0, 3.0, 3.0]}
    assert "data type kMSI_Int32 not match the data type kMSI_Float32" in reply["instances"][1]["error_msg"]
    assert reply["instances"][2] == {"y": [1.0, 1.0, 1.0]}


def test_no_compilation_after_warm_up(batched):
    version = server.registry().servables()["affine"].versions[1]
    before = version.compile_count
    assert before == 4  # buckets 1, 2, 4, 8
    for n in list(range(1, 12)) + [17, 25]:
        x = np.ones((n, 3), np.float32)
        assert _post(batched, [{"x": row.tolist()} for row in x]).status_code == 200
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: _post(batched, [{"x": [1.0, 2.0, 3.0]}] * n), [1, 3, 5, 7, 2, 6] * 3))
    assert version.compile_count == before


def test_batching_off_still_batches_a_request_without_compiling(servable_dir):
    config = server.ServableStartConfig(servable_dir, "affine", max_batch_size=4, batching=False)
    with serving(config, additional=True) as url:  # beside the module's server
        version = server.registry().servables()["affine"].versions[1]
        assert version.batchers == {}
        before = version.compile_count
        x = np.arange(21, dtype=np.float32).reshape(7, 3)
        reply = _post(url, [{"x": row.tolist()} for row in x]).json()
        assert np.array_equal(np.array([i["y"] for i in reply["instances"]], np.float32), affine(x))
        assert version.compile_count == before


def test_queue_full_answers_503_with_retry_after(servable_dir):
    config = server.ServableStartConfig(servable_dir, "affine")
    with serving(config, max_enqueued_requests=2) as url:
        def slow(_):
            return _post(url, [{"x": [1.0, 1.0, 1.0], "seconds": 0.5}], "slow_affine")

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(slow, range(6)))
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
        full = next(r for r in replies if r.status_code == 503)
        assert full.headers["Retry-After"] == "1"
        assert "queue is full" in full.json()["error_msg"]
        # Once the slow ones are done, the server serves again.
        assert _post(url, [{"x": [0.0, 0.0, 0.0]}]).json() == {"instances": [{"y": [1.0, 1.0, 1.0]}]}


def test_timeout_answers_time_out(servable_dir):
    config = server.ServableStartConfig(servable_dir, "affine")
    with serving(config, request_timeout=0.3) as url:
        r = _post(url, [{"x": [1.0, 1.0, 1.0], "seconds": 0.6}], "slow_affine")
        assert r.status_code == 504
        assert r.json() == {"error_msg": "Time out"}
        fast = _post(url, [{"x": [1.0, 1.0, 1.0], "seconds": 0.0}], "slow_affine")
        assert fast.json() == {"instances": [{"y": [3.0, 3.0, 3.0]}]}


DEVICES_SCRIPT = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
import requests
from mserve import server

root = sys.argv[1]
server.start_servables(server.ServableStartConfig(root, "affine", device_ids=[0, 1], max_batch_delay_ms=5))
url = server.start_restful_server("127.0.0.1:0").url
def post(i):
    r = requests.post(url + "/model/affine:affine", json={"instances": [{"x": [float(i)] * 3}]})
    return r.json()["instances"][0]["y"] == [2.0 * i + 1.0] * 3
with ThreadPoolExecutor(16) as pool:
    ok = all(pool.map(post, range(400)))
stage = server.registry().servables()["affine"].versions[1].stages[0]
print(json.dumps({"ok": ok, "calls": [r.calls for r in stage.runtimes],
                  "devices": [str(r.device) for r in stage.runtimes]}))
server.stop()
"""


def test_two_host_devices_both_get_work(servable_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", MSERVE_COMPILE_CACHE="0")
    out = subprocess.run(
        [sys.executable, "-c", DEVICES_SCRIPT, str(servable_dir)],
        env=env, capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"]
    assert len(set(report["devices"])) == 2
    # Warm-up made 4 calls on each device; both must have served requests too.
    assert all(calls > 4 for calls in report["calls"]), report


SYNC_CHECK = """
import jax
from mserve import server
server.start_servables(server.ServableStartConfig({root!r}, "add"))
print(jax.config.values["jax_cpu_enable_async_dispatch"])
server.stop()
"""


@pytest.mark.parametrize("env, expected", [({}, "False"), ({"MSERVE_JAX_CPU_ASYNC": "1"}, "True")])
def test_cpu_computations_run_on_the_calling_thread(env, expected):
    """JAX's asynchronous CPU dispatch only adds a thread hand-off when the caller
    waits at once; start_servables turns it off before JAX makes its CPU client."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SYNC_CHECK.format(root=str(BUNDLED))], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == expected
