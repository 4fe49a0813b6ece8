"""Quick predicts run on the HTTP I/O thread (`mserve.transport.inline`), slow or batched ones
do not. The servables here report the name of the thread that ran them: Waitress's
I/O thread is ``mserve-http``, its worker threads ``waitress-N``."""

from __future__ import annotations

import socket

import pytest
import requests

from mserve import server
from mserve.transport.inline import InlinePolicy
from support import export_to, serving, spec, write_servable

IO_THREAD = "mserve-http"

WHO_CONFIG = """
import threading
import time

from mserve import register


def name(x):
    return threading.current_thread().name


def nap(x):
    time.sleep(0.02)  # waiting, not computing: costs no CPU time
    return threading.current_thread().name


@register.register_method(output_names=["thread"])
def who(x):
    return register.add_stage(name, x, outputs_count=1)


@register.register_method(output_names=["thread"])
def slow(x):
    return register.add_stage(nap, x, outputs_count=1)
"""

BATCHED_CONFIG = """
import threading

from mserve import register

model = register.declare_model(model_file="double.jaxexport", model_format="jax_export")


def name(y):
    return threading.current_thread().name


@register.register_method(output_names=["thread"])
def who(x):
    y = register.add_stage(model, x, outputs_count=1)
    return register.add_stage(name, y, outputs_count=1)
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("inline")
    write_servable(root, "who", WHO_CONFIG)
    (root / "who" / "1").mkdir()
    write_servable(root, "batched", BATCHED_CONFIG)
    export_to(root / "batched" / "1" / "double.jaxexport", lambda x: x * 2, spec("b, 3"))
    return root


def threads(session: requests.Session, url: str, count: int, body: dict | None = None) -> list[str]:
    names = []
    for _ in range(count):
        r = session.post(url, json=body or {"instances": [{"x": 1.0}]}, timeout=10)
        assert r.status_code == 200, r.text
        names.append(r.json()["instances"][0]["thread"])
    return names


def first_inline(names: list[str]) -> int:
    assert IO_THREAD in names, names
    return names.index(IO_THREAD)


def inline_count(base: str) -> float:
    """mserve_inline_requests_total for who:who, from /metrics."""
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mserve_inline_requests_total{") and 'method="who"' in line and 'servable="who"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_quick_method_moves_to_the_io_thread_and_stays(root):
    with serving(server.ServableStartConfig(root, "who")) as base, requests.Session() as session:
        before = inline_count(base)
        names = threads(session, base + "/model/who:who", 40)
        start = first_inline(names)
        assert start >= 4  # it learns the cost from a few requests in worker threads first
        assert all(n.startswith("waitress") for n in names[:start])
        rest = names[start:]
        assert rest.count(IO_THREAD) >= len(rest) - 2, names  # a GC pause may cost one or two
        assert inline_count(base) - before == names.count(IO_THREAD)  # the metric counts them


def test_a_method_that_waits_is_sent_back_to_worker_threads(root):
    """Sleeping costs no CPU, so it looks quick until two inline runs take 20 ms each."""
    with serving(server.ServableStartConfig(root, "who")) as base, requests.Session() as session:
        names = threads(session, base + "/model/who:slow", 20)
        start = first_inline(names)
        assert names[start : start + 2] == [IO_THREAD, IO_THREAD]
        assert IO_THREAD not in names[start + 2 :], names


def test_methods_that_batch_across_requests_never_run_inline(root):
    config = server.ServableStartConfig(root, "batched", max_batch_size=4)
    with serving(config) as base, requests.Session() as session:
        names = threads(session, base + "/model/batched:who", 30, {"instances": [{"x": [1.0, 2.0, 3.0]}]})
        assert IO_THREAD not in names


def test_inline_max_ms_0_turns_it_off(root):
    with serving(server.ServableStartConfig(root, "who"), inline_max_ms=0) as base, requests.Session() as session:
        assert IO_THREAD not in threads(session, base + "/model/who:who", 30)


def test_pipelined_requests_on_the_io_thread_are_answered_in_order(root):
    with serving(server.ServableStartConfig(root, "who")) as base, requests.Session() as session:
        first_inline(threads(session, base + "/model/who:who", 20))
        host, port = base.removeprefix("http://").split(":")
        bodies = [b'{"instances": [{"x": %d}]}' % i for i in range(3)]
        wire = b"".join(
            b"POST /model/who:who HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            for body in bodies
        )
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(wire)  # three requests in one write
            received = b""
            while received.count(b"HTTP/1.1 200") < 3 or not received.endswith(b"}"):
                chunk = conn.recv(65536)
                assert chunk, received
                received += chunk
        assert received.count(b'"thread":"mserve-http"') == 3


def test_policy_rules():
    eligible = {"/model/a:m": True, "/model/b:m": False}
    policy = InlinePolicy(0.001, lambda path: eligible[path])
    for path in eligible:
        for _ in range(3):
            policy.observe(path, 0.0001)
    assert not policy.allows("POST", "/model/a:m", 100)  # three samples are too few
    policy.observe("/model/a:m", 0.0001)
    policy.observe("/model/b:m", 0.0001)
    assert policy.allows("POST", "/model/a:m", 100)
    assert not policy.allows("POST", "/model/b:m", 100)  # batches across requests
    assert not policy.allows("GET", "/model/a:m", 0)
    assert policy.allows("POST", "/model/a:m", 16 * 1024)
    assert not policy.allows("POST", "/model/a:m", 16 * 1024 + 1)  # large bodies decode slowly
    assert not policy.allows("POST", "/model/c:m", 100)  # never seen

    policy.observe("/model/a:m", 0.0001, inline_wall_seconds=0.05)  # one slow run: preempted?
    assert policy.allows("POST", "/model/a:m", 100)
    policy.observe("/model/a:m", 0.0001, inline_wall_seconds=0.0002)
    policy.observe("/model/a:m", 0.0001, inline_wall_seconds=0.05)
    assert policy.allows("POST", "/model/a:m", 100)  # not two in a row
    policy.observe("/model/a:m", 0.0001, inline_wall_seconds=0.05)
    assert not policy.allows("POST", "/model/a:m", 100)  # two in a row: backs off

    busy = InlinePolicy(0.001, lambda path: True)
    for _ in range(4):
        busy.observe("/model/a:m", 0.0001)
    for _ in range(5):  # slow but hardly blocked: preempted on a busy machine
        busy.observe("/model/a:m", 0.0001, inline_wall_seconds=0.2, blocked_seconds=0.0005)
    assert busy.allows("POST", "/model/a:m", 100)
    busy.observe("/model/a:m", 0.0001, inline_wall_seconds=0.2, blocked_seconds=0.15)
    assert not busy.allows("POST", "/model/a:m", 100)  # blocked 100 ms or more: backs off at once


def test_thread_clock_tells_blocked_from_busy():
    """A sleep is blocked time (wall - CPU - run-queue wait), a busy loop is CPU time."""
    import time

    from mserve.transport.inline import ThreadClock

    clock = ThreadClock()
    wall, (cpu, queued) = time.perf_counter(), clock.sample()
    time.sleep(0.05)
    elapsed, (cpu2, queued2) = time.perf_counter() - wall, clock.sample()
    assert elapsed - (cpu2 - cpu) - (queued2 - queued) > 0.04
    wall, (cpu, queued) = time.perf_counter(), clock.sample()
    while time.perf_counter() - wall < 0.05:
        pass
    elapsed, (cpu2, queued2) = time.perf_counter() - wall, clock.sample()
    assert (cpu2 - cpu) + (queued2 - queued) > 0.04  # on a CPU, or waiting for one: not blocked

    costly = InlinePolicy(0.001, lambda path: True)
    for _ in range(10):
        costly.observe("/model/a:m", 0.004)
    assert not costly.allows("POST", "/model/a:m", 100)
    assert not InlinePolicy(0, lambda path: True).allows("POST", "/model/a:m", 100)


def test_eligibility_follows_the_registry(root):
    """inline_eligible keeps its answers only while the registry is unchanged: a path
    that named nothing (answered at once) names a batched method once it loads."""
    runtime = server.default_runtime()

    with serving(server.ServableStartConfig(root, "who")):
        handler = runtime.handlers[0]
        assert handler.inline_eligible("/model/who:who")
        assert handler.inline_eligible("/model/batched:who")  # unknown yet: a quick 404
        server.start_servables(server.ServableStartConfig(root, "batched", max_batch_size=4))
        assert not handler.inline_eligible("/model/batched:who")
        assert handler.inline_eligible("/model/who:who")


def test_rusage_clock_counts_blocked_time_only_for_a_thread_that_gave_up_its_cpu():
    import resource
    import time

    from mserve.transport.inline import RusageClock

    def usage(cpu: float, voluntary: int, involuntary: int) -> resource.struct_rusage:
        fields = [0] * 16
        fields[0], fields[14], fields[15] = cpu, voluntary, involuntary  # ru_utime, ru_nvcsw, ru_nivcsw
        return resource.struct_rusage(fields)

    # Preempted only (involuntary switches): off the CPU, but not blocked.
    assert RusageClock.costs(usage(1.0, 5, 5), usage(1.002, 5, 9), 0.050) == pytest.approx((0.002, 0.050, 0.0))
    # Waited (a voluntary switch): all the time off the CPU counts as blocked.
    assert RusageClock.costs(usage(1.0, 5, 5), usage(1.002, 6, 5), 0.050) == pytest.approx((0.002, 0.050, 0.048))
    # A real sleep between two readings of this thread.
    before = RusageClock.sample()
    started = time.perf_counter()
    time.sleep(0.05)
    used, wall, blocked = RusageClock.costs(before, RusageClock.sample(), time.perf_counter() - started)
    assert used < 0.02 and blocked > 0.04
