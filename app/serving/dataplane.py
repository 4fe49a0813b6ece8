"""The dataplane: one predict request from admission to reply, whatever the transport.

    admit -> name the target (REST: the whole body parsed first, as MindSpore does) ->
    find servable/version/method -> decode each instance for the method -> run the
    method's pipeline before the deadline -> build the reply

`Dataplane` is that path without a wire format: admission (``max_enqueued_requests``,
draining, servables still loading), the servable/version/method lookup, the instance
limit, the deadline, `run_method`, and the mapping of failures to a status and
message. REST (`PredictHandler`, JSON) and gRPC (`mserve.transport.grpc`, protobuf)
each bring a decoder and a reply builder, so both transports share every rule.

Request-level failures (JSON, URL, any value, unknown servable, a missing input)
answer ``{"error_msg"}`` (PROTOCOL.md 2.3); failures while running (a stage that
raised) answer ``error_msg`` in that instance's place, or one top-level
``error_msg`` when every instance failed for the same reason (PROTOCOL.md section 3).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

from ..errors import InstanceError, NotFound, PayloadTooLarge, ServingError
from ..protocol.codec import dumps
from ..protocol.rest import build_reply, method_inputs, read_request
from ..protocol.urls import PredictTarget, parse_predict_path
from ..register import MethodDef
from .pipeline import run_method
from .servable import LoadedVersion, ServableRegistry

log = logging.getLogger("mserve.serving.dataplane")

# MindSpore Serving has no cap on instances per request; 100,000 small instances
# (5.6 MB of JSON) cost about 500 MB to decode and run.
DEFAULT_MAX_INSTANCES = 10000

Reply = TypeVar("Reply")
# A transport's decoder: the request's instances, decoded for this version's method
# (each a list of input values, or the instance's error). Raising a ServingError
# fails the whole request.
Decoder = Callable[[LoadedVersion, MethodDef], Sequence[Sequence[Any] | InstanceError]]
# A transport's reply builder: per-instance results -> (status, reply).
Builder = Callable[[MethodDef, Sequence[Any]], tuple[int, Reply]]

LOADING_MESSAGE = "servable is not available: the server is still loading servables"
INTERNAL_MESSAGE = "internal server error, see the server log"


@dataclass
class Outcome(Generic[Reply]):
    """How one predict ended: ``status`` (an HTTP status, whatever the transport),
    and either the transport's ``reply`` or, for a whole-request failure, ``error``
    (the client-facing message)."""

    status: int
    reply: Reply | None = None
    error: str | None = None


class Dataplane:
    """Admission, lookup, limits, deadline, pipeline and error mapping for one transport.

    ``max_enqueued_requests`` bounds the requests inside the server at once, those
    still waiting for a thread included (`should_shed`; more are refused with 503);
    ``request_timeout`` (seconds) bounds each one (instances that miss it get ``Time
    out``; 504); ``max_instances`` bounds the instances of one request (413 beyond);
    ``loading`` says whether servables are still loading (then an unknown servable is
    a 503, not a 404).
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
        with a 503 at once instead of queueing them."""
        return self.draining or queued + self._active >= self.max_enqueued_requests

    def shed_reason(self) -> str:
        """Why a request over capacity is refused (MindSpore Serving's wording, then ours)."""
        if self.draining:
            return "server is shutting down"
        return (
            f"Serving Error: enqueued requests count exceeds the limit {self.max_enqueued_requests} "
            "(the request queue is full, retry later)"
        )

    def check_instance_count(self, count: int) -> None:
        """A request may carry at most ``max_instances`` instances: every instance
        costs decoding, numpy objects and reply space, well beyond its bytes."""
        if count > self.max_instances:
            raise PayloadTooLarge(
                f"the request has {count} instances, more than the limit {self.max_instances} "
                "(max_instances_per_request): split it into smaller requests"
            )

    def predict(
        self, target: Callable[[], PredictTarget], decode: Decoder, build: Builder[Reply], where: str = ""
    ) -> Outcome[Reply]:
        """Run one request. ``target`` names what it calls (raising `BadRequest` for
        a bad name), ``decode`` and ``build`` are the transport's. Never raises."""
        with self._lock:
            admitted = self._active < self.max_enqueued_requests and not self.draining
            if admitted:
                self._active += 1
        if not admitted:
            return Outcome(503, error=self.shed_reason())
        deadline = time.monotonic() + self.request_timeout
        try:
            named = target()
            version, method = self.registry.lookup(named.servable, named.version, named.method)
            results = run_method(version, method, decode(version, method), deadline)
            status, reply = build(method, results)
            return Outcome(status, reply)
        except NotFound as exc:
            if self.loading():
                return Outcome(503, error=LOADING_MESSAGE)
            return Outcome(exc.status, error=exc.message)
        except ServingError as exc:
            return Outcome(exc.status, error=exc.message)
        except BaseException:  # noqa: BLE001 - whatever happens, the client gets a reply
            log.exception("predict %s failed", where)
            return Outcome(500, error=INTERNAL_MESSAGE)
        finally:
            with self._lock:
                self._active -= 1

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


class PredictHandler(Dataplane):
    """The REST side: answers ``POST /model/...`` bodies with JSON. The reply leaves
    at the deadline whatever a stage is still doing (the transport sends
    `deadline_reply`, see `mserve.transport.wsgi.DeadlineWatch`; 504 ``Time out``)."""

    def shed_reply(self) -> tuple[int, bytes, dict[str, str]]:
        """The fast 503 for a request over capacity."""
        return 503, dumps({"error_msg": self.shed_reason()}), {"Retry-After": "1"}

    def deadline_reply(self) -> tuple[int, bytes, dict[str, str]]:
        """What a client gets when its request is still running at the deadline."""
        return 504, dumps({"error_msg": "Time out"}), {}

    def handle(self, path: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """Answer one predict request: status, JSON body, extra headers. Never raises."""

        instances: list[Any] = []

        def target() -> PredictTarget:
            # MindSpore parses the whole body (JSON, URL, every value) before the lookup.
            named, parsed = read_request(path, body, self.check_instance_count)
            instances.extend(parsed)
            return named

        def decode(version: LoadedVersion, method: MethodDef) -> list[Any]:
            return method_inputs(instances, method, version.name)

        outcome = self.predict(target, decode, build_reply, where=path)
        status = outcome.status
        headers = {"Retry-After": "1"} if status == 503 else {}
        if outcome.error is not None:
            return status, dumps({"error_msg": outcome.error}), headers
        try:
            data = dumps(outcome.reply)
        except Exception:  # an output the codec let through but JSON cannot carry
            log.exception("predict %s: the reply cannot be serialized", path)
            status, data = 500, dumps({"error_msg": "internal server error: the reply cannot be encoded as JSON"})
        return status, data, headers

