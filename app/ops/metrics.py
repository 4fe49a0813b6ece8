"""Prometheus metrics: request counters and latencies, batching, compilations.

Everything is registered in `REGISTRY` (not prometheus-client's global one), served
by ``GET /metrics``. Names (all ``mserve_``):

==========================================  =========  ===============================
name                                        type       labels
==========================================  =========  ===============================
mserve_requests_total                       counter    servable, method, status
mserve_request_duration_seconds             histogram  servable, method
mserve_inline_requests_total                counter    servable, method
mserve_queue_duration_seconds               histogram  servable, version, model
mserve_model_duration_seconds               histogram  servable, version, model
mserve_batch_size                           histogram  servable, version, model
mserve_batch_padding_rows_total             counter    servable, version, model
mserve_batch_frontends                      histogram  servable, version, model
mserve_model_placement                      gauge      servable, version, model, device, process
mserve_queue_depth                          gauge      servable, version, model
mserve_compilations_total                   counter    servable, version, model
mserve_version_loads_total                  counter    servable, outcome
mserve_ready                                gauge      (none)
mserve_host_batches_total                   counter    host
==========================================  =========  ===============================

``mserve_batch_frontends``: per device call of a device process, how many
front-end processes its rows came from (above 1: one batch mixed requests that
arrived on different front-ends). ``mserve_model_placement`` is 1 for each device
and process (``process``: its pid) that holds a model of a loaded version.
``mserve_host_batches_total``: batches each host of a distributed servable
(docs/distributed.md) ran and answered, warm-up included; every host runs every
batch, so each host's count equals the batches of the group.

``servable``/``method`` of a request are ``_unknown`` unless they name a loaded
servable and one of its methods (so a client cannot grow the label set). ``model`` is
the model's first file name. Queue time and batch sizes exist for models batched
across requests; model time for every model stage.

The request path pays for a dict lookup, one counter increment and one histogram
observation: label children are cached per (URL path, status).

Several worker processes (``mserve start --workers N``): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before starting; then every
worker writes its values there and any worker's ``/metrics`` answers the sum over
all workers (prometheus-client's multiprocess mode): counters and histograms add
up, ``mserve_queue_depth`` sums the live workers, ``mserve_ready`` counts the ready
ones. Process and GC collectors are left out in that mode.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from ..serving.batching import BatchObserver
from ..protocol.urls import parse_predict_path

UNKNOWN = "_unknown"

# Sub-millisecond predicts are the common case for small models.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory, when that mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


disable_created_metrics()  # no *_created series next to every counter and histogram

REGISTRY = CollectorRegistry(auto_describe=True)
if not multiprocess_dir():
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)
    GCCollector(registry=REGISTRY)

REQUESTS = Counter(
    "mserve_requests",
    "Predict requests answered, by servable, method and HTTP status.",
    ["servable", "method", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "mserve_request_duration_seconds",
    "Predict request latency inside the server, from the request line to the reply.",
    ["servable", "method"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
INLINE_REQUESTS = Counter(
    "mserve_inline_requests",
    "Predict requests run on the HTTP I/O thread instead of a worker thread (mserve.transport.inline).",
    ["servable", "method"],
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "mserve_queue_duration_seconds",
    "Time an instance waited in a model's cross-request batch queue.",
    ["servable", "version", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
MODEL_SECONDS = Histogram(
    "mserve_model_duration_seconds",
    "Time of one model call on a device (a whole batch when batched).",
    ["servable", "version", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "mserve_batch_size",
    "Instances per device call of models batched across requests (before padding).",
    ["servable", "version", "model"],
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
PADDING = Counter(
    "mserve_batch_padding_rows",
    "Zero rows added to fill batches up to a compiled batch size.",
    ["servable", "version", "model"],
    registry=REGISTRY,
)
BATCH_FRONTENDS = Histogram(
    "mserve_batch_frontends",
    "Front-end processes whose rows shared one device call (device processes only).",
    ["servable", "version", "model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
    registry=REGISTRY,
)
PLACEMENT = Gauge(
    "mserve_model_placement",
    "1 for each device and process (pid) that holds a model of a loaded version.",
    ["servable", "version", "model", "device", "process"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "mserve_queue_depth",
    "Instances waiting in a model's batch queue.",
    ["servable", "version", "model"],
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
COMPILATIONS = Counter(
    "mserve_compilations",
    "Programs compiled, at warm-up and (should not happen) on the request path.",
    ["servable", "version", "model"],
    registry=REGISTRY,
)
VERSION_LOADS = Counter(
    "mserve_version_loads",
    "Servable versions loaded, at start and by hot reload; outcome ok or failed.",
    ["servable", "outcome"],
    registry=REGISTRY,
)
READY = Gauge(
    "mserve_ready",
    "1 while the server answers /ready with 200 (with worker processes: how many are ready).",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)

HOST_BATCHES = Counter(
    "mserve_host_batches",
    "Batches each host's JAX process of a distributed servable ran and answered, warm-up included.",
    ["host"],
    registry=REGISTRY,
)

PER_VERSION = (QUEUE_SECONDS, MODEL_SECONDS, BATCH_SIZE, PADDING, QUEUE_DEPTH, COMPILATIONS, BATCH_FRONTENDS)


def render(accept: str | None) -> tuple[bytes, str]:
    """The exposition for a scrape with this Accept header: (body, content type)."""
    encoder, content_type = choose_encoder(accept or "")
    if multiprocess_dir():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type


# ------------------------------------------------------------------ requests


class RequestMetrics:
    """Counts predict requests and their latency, labels cached per (path, status)."""

    MAX_CACHED = 4096

    def __init__(self, servables: Callable[[], dict[str, Any]]):
        self._servables = servables  # name -> Servable, as the registry has them now
        self._children: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def observe(self, path: str, status: int, seconds: float, inline: bool = False) -> None:
        children = self._children.get((path, status))
        if children is None:
            children = self._resolve(path, status)
        children[0].inc()
        children[1].observe(seconds)
        if inline:
            children[2].inc()

    def _resolve(self, path: str, status: int) -> tuple[Any, Any, Any]:
        servable = method = UNKNOWN
        try:
            target = parse_predict_path(path)
        except Exception:
            target = None
        if target is not None:
            found = self._servables().get(target.servable)
            if found is not None and target.method in found.definition.methods:
                servable, method = target.servable, target.method
        children = (
            REQUESTS.labels(servable, method, str(status)),
            REQUEST_SECONDS.labels(servable, method),
            INLINE_REQUESTS.labels(servable, method),
        )
        # Only known names are cached: unknown paths are rare, and caching them
        # would let a client grow the cache (and a name known later stays unknown).
        if servable != UNKNOWN and len(self._children) < self.MAX_CACHED:
            self._children[(path, status)] = children
        return children


# ------------------------------------------------------------------ batching


def model_label(stage: Any) -> str:
    files = getattr(stage.model, "model_files", None) or ["model"]
    return os.path.basename(str(files[0]))


class _StageMetrics:
    """The label children of one model stage of one loaded version."""

    __slots__ = ("label", "queue", "model", "size", "padding", "depth", "compilations", "compiled", "frontends")

    def __init__(self, servable: str, version: str, model: str, batched: bool):
        self.label = model
        labels = (servable, version, model)
        self.model = MODEL_SECONDS.labels(*labels)
        self.compilations = COMPILATIONS.labels(*labels)
        self.compiled = 0
        # Queue and batch series only for models batched across requests.
        self.queue = QUEUE_SECONDS.labels(*labels) if batched else None
        self.size = BATCH_SIZE.labels(*labels) if batched else None
        self.padding = PADDING.labels(*labels) if batched else None
        self.depth = QUEUE_DEPTH.labels(*labels) if batched else None
        self.frontends = BATCH_FRONTENDS.labels(*labels) if batched else None

    def count_compilations(self, total: int) -> None:
        if total != self.compiled:
            if total > self.compiled:
                self.compilations.inc(total - self.compiled)
            self.compiled = total


class VersionObserver(BatchObserver):
    """The batch hooks of one loaded version, feeding the histograms and gauges."""

    def __init__(self, servable: str, version: int):
        self.servable = servable
        self.version = str(version)
        self._stages: dict[int, _StageMetrics] = {}

    def stage(self, stage: Any, batched: bool = True) -> _StageMetrics:
        found = self._stages.get(id(stage))
        if found is None:
            found = self._stages[id(stage)] = _StageMetrics(self.servable, self.version, model_label(stage), batched)
        return found

    def batch(self, stage: Any, size: int, padded: int, queue_seconds: Sequence[float], run_seconds: float) -> None:
        m = self.stage(stage)
        m.size.observe(size)
        if padded > size:
            m.padding.inc(padded - size)
        m.model.observe(run_seconds)
        for seconds in queue_seconds:
            m.queue.observe(seconds)
        m.count_compilations(stage.compile_count)

    def queue_depth(self, stage: Any, depth: int) -> None:
        self.stage(stage).depth.set(depth)

    def sources(self, stage: Any, count: int) -> None:
        self.stage(stage).frontends.observe(count)

    def attach(self, loaded: Any) -> None:
        """After load: count warm-up compilations, time the model calls of stages
        that no cross-request batcher times, and say where each model lives."""
        self._placements = []
        for index, stage in loaded.stages.items():
            m = self.stage(stage, batched=index in loaded.batchers)
            m.count_compilations(stage.compile_count)
            for where in placement(stage):
                labels = (self.servable, self.version, m.label, where["device"], str(where["pid"]))
                PLACEMENT.labels(*labels).set(1)
                self._placements.append(labels)
            if index not in loaded.batchers:
                stage.runtimes = [_TimedRuntime(r, m) for r in stage.runtimes]

    def detach(self) -> None:
        """After unload: the version's series end (so reloads do not pile up label
        sets); in multiprocess mode, where series cannot be removed, its queue depth
        reads 0."""
        for m in self._stages.values():
            if m.depth is not None:
                m.depth.set(0)
        for labels in getattr(self, "_placements", ()):
            PLACEMENT.labels(*labels).set(0)
            if not multiprocess_dir():
                try:
                    PLACEMENT.remove(*labels)
                except KeyError:
                    pass
        if multiprocess_dir():
            return
        for labels in {(self.servable, self.version, m.label) for m in self._stages.values()}:
            for family in PER_VERSION:
                try:
                    family.remove(*labels)
                except KeyError:
                    pass


def placement(stage: Any) -> list[dict[str, Any]]:
    """Where a model stage's model lives: ``[{"device": "cpu:0", "pid": 123, "role":
    ...}]``, one entry per copy. ``role``: ``"device process"`` (the copy that serves
    the device), ``"front-end copy"`` (a small CPU model each front-end also holds,
    see mserve.devices.frontend) or ``"this process"`` (everything in one process).
    Stages of front-ends say it themselves (``stage.placement``)."""
    remote = getattr(stage, "placement", None)
    if remote is not None:
        return list(remote)
    return [{"device": device_name(r), "pid": os.getpid(), "role": "this process"} for r in stage.runtimes]


# Local device name -> the machine's: a device process that sees only GPU 3 (as its
# gpu:0, through CUDA_VISIBLE_DEVICES) sets {"gpu:0": "gpu:3"} here.
DEVICE_RENAMES: dict[str, str] = {}


def device_name(runtime: Any) -> str:
    """``platform:id`` of a runtime's device (``cpu:0``, ``gpu:1``, numbered as on the
    machine, not as ``CUDA_VISIBLE_DEVICES`` renumbers them), or what a plugin gives."""
    name = _local_device_name(runtime)
    return DEVICE_RENAMES.get(name, name)


def _local_device_name(runtime: Any) -> str:
    device = getattr(runtime, "device", None)
    if device is None:
        inner = getattr(runtime, "_runtime", None)
        return _local_device_name(inner) if inner is not None else "unknown"
    platform, number = getattr(device, "platform", None), getattr(device, "id", None)
    if platform is not None and number is not None:
        return f"{platform}:{number}"
    if isinstance(device, tuple) and len(device) == 2:
        return f"{device[0]}:{device[1]}"
    return str(device)


class _TimedRuntime:
    """A model runtime whose ``predict`` feeds mserve_model_duration_seconds (and
    counts compilations it caused; warm-up's were counted at attach)."""

    def __init__(self, runtime: Any, metrics: _StageMetrics):
        self._runtime = runtime
        self._metrics = metrics
        self._observe = metrics.model.observe  # bound once: this runs on every model call
        self._compiled = getattr(runtime, "compile_count", 0)

    def predict(self, arrays: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._runtime.predict(arrays)
        finally:
            self._observe(time.perf_counter() - started)
            if getattr(self._runtime, "compile_count", 0) != self._compiled:
                self._count_compilations()

    def _count_compilations(self) -> None:
        compiled = getattr(self._runtime, "compile_count", 0)
        self._metrics.compilations.inc(max(compiled - self._compiled, 0))
        self._compiled = compiled

    @property
    def compile_count(self) -> int:
        return getattr(self._runtime, "compile_count", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


class MetricsObserver(BatchObserver):
    """``Runtime.observer``: hands each loaded version its own `VersionObserver`."""

    def bind(self, servable: str, version: int) -> VersionObserver:
        return VersionObserver(servable, version)
