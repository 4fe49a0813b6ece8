"""The dataplane: one predict request from admission to reply, whatever the transport.

    parse the request whole (JSON, URL, every value; find servable/version/method;
    check the inputs) -> run the method's pipeline -> encode each instance's outputs
    -> reply

Request-level failures (JSON, URL, any value, unknown servable, a missing input)
answer ``{"error_msg"}`` (PROTOCOL.md 2.3); failures while running (a stage that
raised) answer ``error_msg`` in that instance's place, or one top-level
``error_msg`` when every instance failed for the same reason (PROTOCOL.md section 3).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from ..errors import NotFound, PayloadTooLarge, ServingError
from ..protocol.codec import dumps
from ..protocol.rest import build_reply, parse_request
from ..protocol.urls import parse_predict_path
from ..register import MethodDef
from .pipeline import run_method
from .servable import LoadedVersion, ServableRegistry

log = logging.getLogger("mserve.serving.dataplane")

# MindSpore Serving has no cap on instances per request; 100,000 small instances
# (5.6 MB of JSON) cost about 500 MB to decode and run.
DEFAULT_MAX_INSTANCES = 10000


class PredictHandler:
    """Answers predict requests for the servables in ``registry``.

    ``max_enqueued_requests`` bounds the requests inside the server at once, those
    still waiting for a thread included (`should_shed`; more get a fast 503 with
    Retry-After); ``request_timeout`` (seconds) bounds each one: the reply leaves at
    the deadline whatever a stage is still doing (the transport sends
    `deadline_reply`, see `mserve.transport.wsgi.DeadlineWatch`; 504 ``Time out``).
    ``max_instances`` bounds the instances of one request (413 beyond).
    """

    def __init__(
        self,
        registry: ServableRegistry,
        max_enqueued_requests: int = 10000,
        request_timeout: float = 100.0,
        loading: Callable[[], bool] = lambda: False,
        max_instances: int = DEFAULT_MAX_INSTANCES,
    ):
        self.registry = registry
        self.loading = loading  # servables still loading: a 404 may only mean "not yet"
        self.max_enqueued_requests = max_enqueued_requests
        self.request_timeout = request_timeout
        self.max_instances = max_instances
        self._active = 0
        self._lock = threading.Lock()
        self.draining = False
        self._eligible: dict[str, bool] = {}  # inline_eligible's answers ...
        self._eligible_in: dict | None = None  # ... for this registry snapshot

    @property
    def active(self) -> int:
        return self._active

    def should_shed(self, queued: int) -> bool:
        """Whether a request arriving now is over capacity: ``queued`` requests wait
        for a thread in the transport, on top of those inside the handler (running,
        or past their deadline but still in a stage). The transport answers those
        with `shed_reply` at once instead of queueing them."""
        return self.draining or queued + self._active >= self.max_enqueued_requests

    def shed_reply(self) -> tuple[int, bytes, dict[str, str]]:
        """The fast 503 for a request over capacity (MindSpore Serving's wording, then ours)."""
        reason = (
            "server is shutting down"
            if self.draining
            else f"Serving Error: enqueued requests count exceeds the limit {self.max_enqueued_requests} "
            "(the request queue is full, retry later)"
        )
        return 503, dumps({"error_msg": reason}), {"Retry-After": "1"}

    def deadline_reply(self) -> tuple[int, bytes, dict[str, str]]:
        """What a client gets when its request is still running at the deadline."""
        return 504, dumps({"error_msg": "Time out"}), {}

    def handle(self, path: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """Answer one predict request: status, JSON body, extra headers. Never raises."""
        headers: dict[str, str] = {}
        with self._lock:
            admitted = self._active < self.max_enqueued_requests and not self.draining
            if admitted:
                self._active += 1
        if not admitted:
            return self.shed_reply()
        try:
            status, reply = self._handle(path, body, time.monotonic() + self.request_timeout)
        except NotFound as exc:
            if self.loading():
                status, reply = 503, {"error_msg": "servable is not available: the server is still loading servables"}
            else:
                status, reply = exc.status, {"error_msg": exc.message}
        except ServingError as exc:
            status, reply = exc.status, {"error_msg": exc.message}
        except BaseException:  # noqa: BLE001 - whatever happens, the client gets a reply
            log.exception("predict %s failed", path)
            status, reply = 500, {"error_msg": "internal server error, see the server log"}
        finally:
            with self._lock:
                self._active -= 1
        if status == 503:
            headers["Retry-After"] = "1"
        try:
            data = dumps(reply)
        except Exception:  # an output the codec let through but JSON cannot carry
            log.exception("predict %s: the reply cannot be serialized", path)
            status, data = 500, dumps({"error_msg": "internal server error: the reply cannot be encoded as JSON"})
        return status, data, headers

    def inline_eligible(self, path: str) -> bool:
        """Whether a request to ``path`` may run on the I/O thread at all: not when
        its version batches across requests, which needs requests side by side.
        Asked on the I/O thread for every candidate request, so the answers are kept
        until the registry changes (a load, a reload, a retired version)."""
        snapshot = self.registry.servables()
        if snapshot is not self._eligible_in:
            self._eligible, self._eligible_in = {}, snapshot
        eligible = self._eligible.get(path)
        if eligible is None:
            try:
                version, _ = self._resolve(path)
                eligible = not version.batchers
            except ServingError:
                eligible = True  # answered at once
            self._eligible[path] = eligible  # paths come from InlinePolicy's bounded table
        return eligible

    def _resolve(self, path: str) -> tuple[LoadedVersion, MethodDef]:
        target = parse_predict_path(path)
        return self.registry.lookup(target.servable, target.version, target.method)

    def check_instance_count(self, count: int) -> None:
        """A request may carry at most ``max_instances`` instances: every instance
        costs decoding, numpy objects and reply space, well beyond its bytes."""
        if count > self.max_instances:
            raise PayloadTooLarge(
                f"the request has {count} instances, more than the limit {self.max_instances} "
                "(max_instances_per_request): split it into smaller requests"
            )

    def _handle(self, path: str, body: bytes, deadline: float) -> tuple[int, dict]:
        version, method, inputs = parse_request(path, body, self.registry.lookup, self.check_instance_count)
        results = run_method(version, method, inputs, deadline)
        return build_reply(method, results)
