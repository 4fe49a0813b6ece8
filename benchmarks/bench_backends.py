"""What the backend layer costs: MindIR through mserve against MindSpore directly, and
a sharded model against the same model unsharded on 4 simulated devices.

    flock /tmp/mserve-bench.lock .venv/bin/python benchmarks/bench_backends.py [--seconds 2]

MindIR (needs ``pip install -e '.[mindspore]'``; skipped otherwise): the 2x2 add,
exported by MindSpore in this run, timed per call

* by MindSpore directly (``nn.GraphCell(mindspore.load(f))(Tensor(x1), Tensor(x2))``);
* through mserve's MindIR runtime (``runtime.predict``: the backend layer alone);
* through the in-process predict path (the WSGI app: JSON decode, pipeline, MindIR,
  JSON encode), next to the bundled jax_export add through the same path;

Sharding (a child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``):
an MLP 1024-4096-1024 (32 MiB of float32 weights) served as one instance on device 0,
as 4 replicas (``device_ids=[0,1,2,3]``, one instance each) and as ONE instance
sharded over the 4 devices (w1 split by columns, w2 by rows); rows/s of batch-32
calls through each model stage, from 1 and from 4 caller threads. The simulated
devices share this machine's cores, so this shows what sharding costs in
coordination, not what 4 real devices would gain.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

ADD_BODY = json.dumps({"instances": [{"x1": [[1.0, 2.0], [3.0, 4.0]], "x2": [[1.0, 2.0], [3.0, 4.0]]}]}).encode()
ADD_CONFIG = """
from mserve import register

model = register.declare_model(model_file="tensor_add.mindir", model_format="MindIR", with_batch_dim=False)


@register.register_method(output_names=["y"])
def add_common(x1, x2):
    return register.add_stage(model, x1, x2, outputs_count=1)
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per_call(call, seconds: float) -> tuple[float, float, int]:
    """(wall µs, CPU µs, calls) per call, after a short warm-up."""
    end = time.perf_counter() + min(0.3, seconds / 5)
    while time.perf_counter() < end:
        call()
    calls, wall, cpu = 0, time.perf_counter(), _cpu()
    end = wall + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            call()
        calls += 50
    return (time.perf_counter() - wall) / calls * 1e6, (_cpu() - cpu) / calls * 1e6, calls


def mindir_rows(seconds: float) -> list[tuple[str, float, float]]:
    try:
        import mindspore as ms
        from mindspore import Tensor, nn, ops
    except ImportError:
        print("mindspore is not installed: skipping the MindIR rows (pip install -e '.[mindspore]')")
        return []
    from mserve import server

    class Add(nn.Cell):
        def construct(self, x, y):
            return ops.add(x, y)

    root = Path(tempfile.mkdtemp(prefix="bench_backends_"))
    folder = root / "msadd"
    (folder / "1").mkdir(parents=True)
    (folder / "servable_config.py").write_text(textwrap.dedent(ADD_CONFIG))
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    ms.export(Add(), Tensor(x), Tensor(x), file_name=str(folder / "1" / "tensor_add"), file_format="MINDIR")
    path = folder / "1" / "tensor_add.mindir"

    cell = nn.GraphCell(ms.load(str(path)))
    rows = [("MindSpore directly: GraphCell(Tensor(x1), Tensor(x2)).asnumpy()",
             *_per_call(lambda: cell(Tensor(x), Tensor(x)).asnumpy(), seconds)[:2])]

    server.use_processes("single")  # the models in this process, where the runtime is timed
    server.start_servables([server.ServableStartConfig(root, "msadd"),
                            server.ServableStartConfig(REPO / "servables", "add")])
    app = server.start_restful_server("127.0.0.1:0", inline_max_ms=0).transport.app.app
    try:
        runtime = server.registry().servables()["msadd"].versions[1].stages[0].runtimes[0]
        rows.append(("mserve MindIR runtime.predict([x1, x2])", *_per_call(lambda: runtime.predict([x, x]), seconds)[:2]))

        def wsgi(path: str):
            def call() -> None:
                environ = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "CONTENT_LENGTH": str(len(ADD_BODY)),
                           "wsgi.input": io.BytesIO(ADD_BODY), "REMOTE_ADDR": "127.0.0.1"}
                app(environ, lambda status, headers, exc_info=None: None)
            return call

        rows.append(("mserve predict path (JSON in/out), MindIR add", *_per_call(wsgi("/model/msadd:add_common"), seconds)[:2]))
        rows.append(("mserve predict path (JSON in/out), jax_export add (bundled)",
                     *_per_call(wsgi("/model/add:add_common"), seconds)[:2]))
    finally:
        server.stop()
    return rows


MLP_CONFIG = """
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from mserve import register


def mlp(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


options = {{"function": mlp, "input_specs": [("b, 1024", "float32")], "batch_sizes": [32], "max_batch_size": 32}}
if {sharded}:
    options["sharding"] = {{"mesh": "model", "params": {{"w1": P(None, "model"), "w2": P("model", None)}}}}
model = register.declare_model(model_file="weights.npz", model_format="jax_function", options=options)


@register.register_method(output_names=["y"])
def predict(x):
    return register.add_stage(model, x, outputs_count=1)
"""


def sharding_rows(seconds: float) -> list[tuple[str, float]]:
    """In the child process: rows/s of batch-32 calls for each layout."""
    import jax

    from mserve import server

    assert len(jax.devices()) == 4, jax.devices()
    root = Path(tempfile.mkdtemp(prefix="bench_sharding_"))
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((1024, 4096)) / 32).astype(np.float32)
    w2 = (rng.standard_normal((4096, 1024)) / 64).astype(np.float32)
    layouts = {"one device": ("plain", False, 0), "4 replicas": ("plain4", False, [0, 1, 2, 3]),
               "sharded over 4": ("sharded", True, [0, 1, 2, 3])}
    configs = []
    for name, sharded, ids in layouts.values():
        folder = root / name
        (folder / "1").mkdir(parents=True)
        (folder / "servable_config.py").write_text(textwrap.dedent(MLP_CONFIG.format(sharded=sharded)))
        np.savez(folder / "1" / "weights.npz", w1=w1, w2=w2)
        configs.append(server.ServableStartConfig(root, name, device_ids=ids, batching=False))
    server.use_processes("single")  # the model stages in this process, called directly below
    server.start_servables(configs)
    rows = []
    try:
        x = rng.standard_normal((32, 1024)).astype(np.float32)
        batch = [(row,) for row in x]
        reference = None
        for label, (name, _, _) in layouts.items():
            stage = server.registry().servables()[name].versions[1].stages[0]
            out = np.stack([r[0] for r in stage.run_batch(batch)])
            reference = out if reference is None else reference
            assert np.allclose(out, reference, rtol=1e-4, atol=1e-4), f"{label} answers differ"
            for threads in (1, 4):
                counts = [0] * threads
                stop = time.perf_counter() + seconds

                def work(i: int) -> None:
                    while time.perf_counter() < stop:
                        stage.run_batch(batch)
                        counts[i] += 1

                pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
                started = time.perf_counter()
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
                elapsed = time.perf_counter() - started
                rows.append((f"{label} ({len(stage.runtimes)} instance(s)), {threads} caller thread(s)",
                             sum(counts) * 32 / elapsed))
    finally:
        server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measured point")
    parser.add_argument("--sharding-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sharding_child:
        print(json.dumps(sharding_rows(args.seconds)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    rows = mindir_rows(args.seconds)
    if rows:
        direct = rows[0][1]
        print(f"\n{'MindIR add, per call':<70} {'wall µs':>9} {'CPU µs':>9} {'vs direct':>10}")
        for name, wall, cpu in rows:
            print(f"{name:<70} {wall:>9.1f} {cpu:>9.1f} {wall / direct:>9.2f}x")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "MSERVE_COMPILE_CACHE": "0"}
    child = subprocess.run([sys.executable, __file__, "--sharding-child", "--seconds", str(args.seconds)],
                           env=env, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"sharding child failed:\n{child.stderr[-3000:]}")
    shard_rows = json.loads(child.stdout.strip().splitlines()[-1])
    base = shard_rows[0][1]
    print(f"\n{'MLP 1024-4096-1024, batch 32, 4 simulated CPU devices':<70} {'rows/s':>9} {'vs 1 dev':>9}")
    for name, rate in shard_rows:
        print(f"{name:<70} {rate:>9.0f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
