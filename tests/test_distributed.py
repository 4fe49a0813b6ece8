"""Distributed servables: one sharded model over the JAX processes of several hosts,
served by mserve's default process layout.

`mserve start --workers 2 --hosts 2` is the main host: two front-end processes
(REST and gRPC each) feed one device process, which holds the distributed group;
two `mserve agent` processes on localhost (two forced CPU devices each, gloo
collectives) form a 4-device mesh. Starting a JAX group takes seconds on a busy
machine, so the server and agents are started once per module and the fault test
(killing an agent) runs last; the stop at the end must leave no process behind.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from distributed_support import (
    HIDDEN, Agents, agent_env, children, gone, mserve, predict, ready_status, unsharded, wait_for, write_mlp,
)
from support import free_port

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("servables")
    logs = tmp_path_factory.mktemp("logs")
    params = write_mlp(root)
    port, grpc_port, address = free_port(), free_port(), f"127.0.0.1:{free_port()}"
    main_log = open(logs / "main.log", "w")
    main = subprocess.Popen(
        mserve("start", str(root), "--servable", "mlp", "--port", str(port), "--grpc-port", str(grpc_port),
               "--workers", "2", "--distributed-address", address, "--hosts", "2",
               "--max-batch-size", "4", "--max-batch-delay-ms", "200", "--poll-interval", "1"),
        stdout=main_log, stderr=subprocess.STDOUT, env=agent_env(),
    )
    url = f"http://127.0.0.1:{port}"
    agents = Agents(address, logs)
    jax_pids: set[int] = set()
    try:
        for index in (0, 1):
            agents.start(index)

        def serving():  # every front-end (REST and gRPC) serves it
            text = (logs / "main.log").read_text()
            assert main.poll() is None, text
            return "serving on" in text and ready_status(url).status_code == 200

        wait_for(serving, 240, "the distributed servable serves")
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "params": params, "agents": agents,
               "address": address, "jax_pids": jax_pids, "main": main, "root": root, "log": logs / "main.log"}
        jax_pids.update(p for a in agents.procs.values() for p in children(a.pid))
        # Nothing hangs at stop: the main host stops at once, every host's JAX process with it.
        started = time.monotonic()
        main.send_signal(signal.SIGINT)
        assert main.wait(30) == 0, (logs / "main.log").read_text()[-3000:]
        assert time.monotonic() - started < 20
        for pid in jax_pids:
            try:
                wait_for(lambda pid=pid: gone(pid), 10, f"JAX process {pid} exits with the main host")
            except AssertionError as exc:  # what each host said, to tell why
                try:
                    state = Path(f"/proc/{pid}/status").read_text()[:400] + Path(f"/proc/{pid}/cmdline").read_text()
                except OSError as missing:
                    state = str(missing)
                said = state + "\n" + "\n".join(f"--- {a.log_path.name}\n{a.log_path.read_text()[-6000:]}" for a in agents.procs.values())
                raise AssertionError(f"{exc}\n{said}\n--- main\n{(logs / 'main.log').read_text()[-3000:]}") from None
        assert all(a.poll() is None for a in agents.procs.values())  # the agents wait for a main host again
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
        agents.stop_all()


def test_rest_answers_equal_the_unsharded_model(cluster):
    rows = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    reply = predict(cluster["url"], rows)
    assert reply.status_code == 200, reply.text
    got = np.array([item["y"] for item in reply.json()["instances"]], np.float32)
    np.testing.assert_allclose(got, unsharded(cluster["params"], rows), rtol=1e-5, atol=1e-5)


def test_grpc_answers_equal_the_unsharded_model(cluster):
    from mserve.client import Client

    rows = np.random.default_rng(2).normal(size=(3, 8)).astype(np.float32)
    result = Client(cluster["grpc"], "mlp", "predict").infer([{"x": row} for row in rows])
    got = np.array([item["y"] for item in result], np.float32)
    np.testing.assert_allclose(got, unsharded(cluster["params"], rows), rtol=1e-5, atol=1e-5)


def test_each_process_holds_only_its_shards(cluster):
    """Each host's JAX process says what it holds (its line in the agent's output):
    a quarter of every split weight per device, two devices each."""
    params = cluster["params"]
    total = sum(a.nbytes for a in params.values())
    replicated = params["b2"].nbytes  # not split: every device holds it
    devices = []
    for index, agent in sorted(cluster["agents"].procs.items()):
        line = next(x for x in agent.log_path.read_text().splitlines() if f"mserve host {index}:" in x)
        held = json.loads(line.split("SHARDS ", 1)[1])
        assert held["w1"]["shards"] == [[8, HIDDEN // 4]] * 2
        assert held["w2"]["shards"] == [[HIDDEN // 4, 4]] * 2
        bytes_held = int(line.split("holding ", 1)[1].split(" bytes", 1)[0])
        assert bytes_held == (total - replicated) // 2 + 2 * replicated < total
        devices.append(set(line.split(" on ", 1)[1].split(";", 1)[0].split(", ")))
    assert len(devices[0]) == 2 and len(devices[1]) == 2 and not devices[0] & devices[1]


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_batches_of_several_front_ends_run_once_on_all_hosts(cluster):
    """Concurrent requests through REST and gRPC (different front-end processes)
    meet in the device process's batcher: fewer batches than requests, batches
    mixing front-ends, and every host runs every batch exactly once."""
    from mserve.client import Client

    url, params = cluster["url"], cluster["params"]
    model = {"servable": "mlp", "model": "mlp.safetensors"}

    def counts():
        return (metric(url, "mserve_batch_size_count", **model),
                [metric(url, "mserve_host_batches_total", host=str(i)) for i in (0, 1)],
                metric(url, "mserve_batch_frontends_count", **model) - metric(url, "mserve_batch_frontends_bucket",
                                                                              le="1.0", **model))

    clients = [Client(cluster["grpc"], "mlp", "predict") for _ in range(4)]
    sessions = [requests.Session() for _ in range(4)]
    rng = np.random.default_rng(3)
    mixed = 0
    for _attempt in range(4):  # until one batch held rows of two front-ends (timing decides)
        before, host_before, mixed_before = counts()
        rows = rng.normal(size=(8, 8)).astype(np.float32)
        answers: dict[int, np.ndarray] = {}
        start = threading.Barrier(8)

        def rest(i: int) -> None:
            start.wait()
            reply = predict(url, rows[i:i + 1], sessions[i])
            assert reply.status_code == 200, reply.text
            answers[i] = np.array(reply.json()["instances"][0]["y"], np.float32)

        def grpc(i: int) -> None:
            start.wait()
            result = clients[i - 4].infer([{"x": rows[i]}])
            assert isinstance(result, list), result
            answers[i] = np.asarray(result[0]["y"], np.float32)

        threads = [threading.Thread(target=rest if i < 4 else grpc, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 8
        want = unsharded(params, rows)
        for i, got in answers.items():
            np.testing.assert_allclose(got, want[i], rtol=1e-4, atol=1e-4)
        after, host_after, mixed_after = counts()
        batches = after - before
        assert 2 <= batches < 8  # 8 requests, at most 4 rows a batch
        assert [a - b for a, b in zip(host_after, host_before)] == [batches, batches]
        mixed += mixed_after - mixed_before
        if mixed:
            break
    assert mixed >= 1, "no batch held rows of two front-end processes"


def test_an_agent_index_out_of_range_is_refused(cluster):
    proc = subprocess.run(mserve("agent", "--distributed-address", cluster["address"], "--host-index", "5"),
                          capture_output=True, text=True, timeout=60, env=agent_env())
    assert proc.returncode == 2
    assert "host index 5 is out of range" in proc.stderr and "indices 0-1" in proc.stderr


def test_a_second_agent_for_a_taken_host_index_is_refused(cluster):
    started = time.monotonic()
    proc = subprocess.run(mserve("agent", "--distributed-address", cluster["address"], "--host-index", "0"),
                          capture_output=True, text=True, timeout=60, env=agent_env())
    assert proc.returncode == 2, proc.stderr
    assert "host index 0 is already taken" in proc.stderr and "another --host-index" in proc.stderr
    assert time.monotonic() - started < 30
    assert ready_status(cluster["url"]).status_code == 200  # the group did not notice


def test_an_agent_with_another_jax_version_is_refused(cluster):
    from mserve.distributed.links import connect

    link = connect(cluster["address"])
    try:
        link.send(("agent", {"index": 0, "jax": "0.0.1", "coordinator_port": 1}))
        kind, reason = link.recv(timeout=10)
    finally:
        link.close()
    assert kind == "refused"
    assert "jax 0.0.1" in reason and "install the same version on every host" in reason
    assert ready_status(cluster["url"]).status_code == 200


def test_hot_reload_loads_a_new_version_on_every_host_and_keeps_the_old_when_it_fails(cluster):
    """A new version folder: every host loads the new weights (503 meanwhile, never
    an answer of the other version), then it serves. A version the hosts cannot load
    fails with the hosts' reason, and the version served before serves again."""
    from safetensors.numpy import save

    url, root, rows = cluster["url"], cluster["root"] / "mlp", np.ones((1, 8), np.float32)
    old = cluster["params"]
    new = {**old, "b2": old["b2"] + 10.0}
    (root / "2").mkdir()
    (root / "2" / "mlp.safetensors").write_bytes(save(new))

    def answers(params):
        reply = predict(url, rows)
        if reply.status_code == 503:
            return None
        assert reply.status_code == 200, reply.text
        got = np.array([item["y"] for item in reply.json()["instances"]], np.float32)
        if np.allclose(got, unsharded(old, rows), rtol=1e-5, atol=1e-5) and params is not old:
            return None  # still the version before
        np.testing.assert_allclose(got, unsharded(params, rows), rtol=1e-5, atol=1e-5)
        return True

    wait_for(lambda: answers(new), 120, "version 2 answers")
    wait_for(lambda: "[2]" in ready_status(url).text.replace(" ", "") and ready_status(url).status_code == 200, 30,
             "only version 2 is served")
    cluster["params"] = new  # what the module's later tests expect

    # Version 3's hidden layer (30) does not split over the group's 4 devices: the main
    # host traces shapes only (fine), the hosts cannot build their shards and fail.
    (root / "3").mkdir()
    (root / "3" / "mlp.safetensors").write_bytes(save({
        "w1": new["w1"][:, :30].copy(), "b1": new["b1"][:30].copy(), "w2": new["w2"][:30].copy(), "b2": new["b2"]}))
    line = wait_for(lambda: next((x for x in cluster["log"].read_text().splitlines()
                                  if "version 3 failed to load" in x), None), 120, "hot reload reports version 3")
    assert "host" in line, line
    shutil.rmtree(root / "3")
    wait_for(lambda: answers(new), 120, "version 2 serves again")


def test_a_killed_agent_makes_it_unready_then_it_serves_again(cluster):
    url, agents = cluster["url"], cluster["agents"]
    jax_pids = [p for a in agents.procs.values() for p in children(a.pid)]
    assert len(jax_pids) == 2
    cluster["jax_pids"].update(jax_pids)
    victim = agents.procs[1]
    victim.kill()
    victim.wait(5)
    started = time.monotonic()

    def unavailable():
        reply = predict(url, np.ones((1, 8), np.float32))
        return reply if reply.status_code == 503 else None

    reply = wait_for(unavailable, 10, "a predict answers 503")
    assert reply.headers.get("Retry-After")
    assert "host 1" in reply.json()["error_msg"]
    ready = wait_for(lambda: (r := ready_status(url)).status_code == 503 and "host 1" in r.text and r, 5,
                     "/ready names host 1")
    assert ready.headers.get("Retry-After")
    assert time.monotonic() - started < 10
    # the surviving host's JAX process was stopped too (a collective would wait for host 1 forever)
    for pid in jax_pids:
        wait_for(lambda pid=pid: gone(pid), 10, f"JAX process {pid} of the broken generation exits")

    # killed again while the new group loads: unready, naming the host, and no hang
    agents.start(1)
    wait_for(lambda: "starting generation" in ready_status(url).text, 60, "the group starts loading")
    cluster["jax_pids"].update(p for a in agents.procs.values() for p in children(a.pid))
    orphans = children(agents.procs[1].pid)
    agents.procs[1].kill()
    agents.procs[1].wait(5)
    for pid in orphans:  # a killed agent's JAX process goes with it, even in the middle of joining the group
        wait_for(lambda pid=pid: gone(pid), 5, f"JAX process {pid} of the killed agent exits")
    ready = wait_for(lambda: "waiting for host 1" in (r := ready_status(url)).text and r, 10, "/ready names host 1")
    assert ready.status_code == 503 and ready.headers.get("Retry-After")
    assert predict(url, np.ones((1, 8), np.float32)).status_code == 503

    agents.start(1)
    wait_for(lambda: ready_status(url).status_code == 200, 240, "the group serves again")
    rows = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
    reply = predict(url, rows)
    assert reply.status_code == 200, reply.text
    got = np.array([item["y"] for item in reply.json()["instances"]], np.float32)
    np.testing.assert_allclose(got, unsharded(cluster["params"], rows), rtol=1e-5, atol=1e-5)
