"""Prometheus metrics for poold, cheap on the event loop's hot path.

The loop calls ``observe_*`` once per request, batch or lifecycle event. Those methods
only bump plain Python ints in dicts and lists owned by :class:`PoolMetrics`: no
prometheus-client metric objects, no locks, no label resolution. A custom collector
turns that state into metric families when Prometheus scrapes (from the HTTP thread).

Concurrency: only the loop thread writes. The scrape thread reads through C-level copies
(``dict.copy()``, ``list(...)``), each atomic under the GIL, so it never sees a dict
change size mid-iteration. A scrape may see one histogram a request ahead of another;
within one histogram the buckets, ``_count`` and ``_sum`` come from a single copy.
Gauges come from the latest :class:`PoolSnapshot`, an immutable object replaced by one
reference assignment in :meth:`PoolMetrics.publish`.

Metric families (all prefixed ``gpupool_``)::

    requests_total{model,version,code}          counter (every answer, rejections too)
    requests_rejected_total{model,code}         counter (refused at the door: no latency)
    request_{queue,compute}_seconds{model}      histogram (answers that reached a worker)
    request_duration_seconds{model}             histogram (end to end, same requests)
    batch_size{model}                           histogram
    upgrades_total{model,kind,outcome}          counter
    upgrade_phase_seconds{model,phase}          histogram
    upgrade_bytes_freed_total{model}            counter
    worker_exits_total{model,reason}            counter
    queue_depth{model}                          gauge
    workers{model,state}                        gauge
    worker_{gpu,rss}_bytes{model,version,device,pid}, worker_inflight{...}   gauge
    worker_served_total{model,version,device,pid}   counter (resets with the worker)
    model_up{model}, model_state{model,state}   gauge
    snapshot_age_seconds                        gauge (a stale value means a stuck loop)
    build_info{version,python,torch}            gauge, always 1
    gpu_utilization_ratio{device}, gpu_memory_{used,total}_bytes{device}   gauge (NVML)

``/metrics`` speaks OpenMetrics to a scraper that asks for it (``Accept:
application/openmetrics-text``) and the Prometheus text format otherwise, through
prometheus_client's own content negotiation (:meth:`PoolMetrics.render_for`).
"""

from __future__ import annotations

import platform
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "PHASE_BUCKETS",
    "PoolMetrics",
    "PoolSnapshot",
    "RequestTotals",
    "WorkerSample",
]

# 50 us (a local queue hop) up to 60 s (the longest sensible request deadline).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(10))  # 1 .. 512
# Upgrade phases run from a few ms (switch) to minutes (drain, big loads).
PHASE_BUCKETS: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

# States in which the model answers requests (an upgrade keeps the old version serving).
_UP_STATES = frozenset({"serving", "upgrading"})

# Answered without ever reaching a worker: counted, but kept out of the latency
# histograms, where their microseconds would drag every quantile down under overload.
REJECTED = frozenset(
    {"OVERLOADED", "NO_SUCH_MODEL", "MODEL_UNAVAILABLE", "SHUTTING_DOWN", "BAD_REQUEST"}
)

# Model names on the hot path come from the router after it has matched them against
# the routing table, but a bug there must not let clients mint unbounded label values.
MAX_MODELS = 1000
OVERFLOW_MODEL = "_overflow"


@dataclass(frozen=True)
class WorkerSample:
    """One worker as the supervisor sees it at publish time."""

    model: str
    version: str
    generation: int
    device: str
    state: str
    pid: int
    gpu_bytes: int | None  # None: not on a GPU, or NVML could not say
    rss_bytes: int | None
    inflight: int
    served: int


@dataclass(frozen=True)
class StandbySample:
    """One hot standby (pool.standby): a process with its device up and no model."""

    device: str
    state: str  # preparing | waiting
    pid: int
    gpu_bytes: int | None  # its CUDA context (NVML)


@dataclass(frozen=True)
class PoolSnapshot:
    """Gauge values, published by the loop about once a second."""

    workers: tuple[WorkerSample, ...]
    queue_depth: dict[str, int]
    model_state: dict[str, str]  # model -> "serving" | "upgrading" | "failed" | "starting"
    # device -> (utilization 0..1 or None, used bytes, total bytes), from NVML
    devices: dict[str, tuple[float | None, int, int]] = field(default_factory=dict)
    standbys: tuple[StandbySample, ...] = ()
    standbys_taken: dict[str, int] = field(default_factory=dict)  # device -> count
    standbys_died: dict[str, int] = field(default_factory=dict)


class _Histogram:
    """Per-bucket (non-cumulative) counts; the last slot is the +Inf overflow."""

    __slots__ = ("counts", "sum")

    def __init__(self, nbounds: int) -> None:
        self.counts = [0] * (nbounds + 1)
        self.sum = 0.0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        # bisect_left puts a value equal to a bound into that bound's bucket (le = <=).
        self.counts[bisect_left(bounds, value)] += 1
        self.sum += value

    def read(self) -> tuple[list[int], float]:
        # Copy the counts before the sum: a racing write can only make the sum newer.
        return list(self.counts), self.sum


@dataclass(frozen=True)
class RequestTotals:
    """Counters since poold started: they only grow, so two readings give a window."""

    by_version_code: dict[tuple[str, str], int]
    latency_counts: list[int]  # one per LATENCY_BUCKETS bound, then +Inf
    latency_sum_s: float


class _ModelStats:
    """Everything recorded per model, reached with one dict lookup on the hot path."""

    __slots__ = ("requests", "rejected", "queue", "compute", "total", "batch")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (version, code) -> count
        self.rejected: dict[str, int] = {}  # code -> count
        self.queue = _Histogram(len(LATENCY_BUCKETS))
        self.compute = _Histogram(len(LATENCY_BUCKETS))
        self.total = _Histogram(len(LATENCY_BUCKETS))
        self.batch = _Histogram(len(BATCH_BUCKETS))


class PoolMetrics:
    """The daemon's metrics: hot-path recorders plus a private registry to scrape."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelStats] = {}
        self._upgrades: dict[tuple[str, str, str], int] = {}
        self._phases: dict[tuple[str, str], _Histogram] = {}
        self._bytes_freed: dict[str, int] = {}
        self._exits: dict[tuple[str, str], int] = {}
        # (snapshot, monotonic publish time) in one tuple so a reader gets a matching pair.
        self._published: tuple[PoolSnapshot, float] | None = None

        # A private registry: tests and embedders can create several PoolMetrics, and
        # nothing imported elsewhere leaks into poold's endpoint.
        self.registry = CollectorRegistry()
        self.registry.register(_PoolCollector(self))
        # poold's own CPU, memory and fds; cheap and useful when the loop misbehaves.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # -- hot path (event loop thread only) -------------------------------------------------

    def _stats(self, model: str) -> _ModelStats:
        stats = self._models.get(model)
        if stats is None:
            if len(self._models) >= MAX_MODELS:
                model = OVERFLOW_MODEL
                stats = self._models.get(model)
            if stats is None:
                stats = self._models[model] = _ModelStats()
        return stats

    def observe_request(
        self,
        model: str,
        version: str,
        code: str,
        queue_s: float,
        compute_s: float,
        total_s: float,
    ) -> None:
        """Record one answered request. ``version`` is "" when no worker computed it."""
        stats = self._models.get(model) or self._stats(model)
        key = (version, code)
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        if not version and code in REJECTED:
            rejected = stats.rejected
            rejected[code] = rejected.get(code, 0) + 1
            return
        # Inlined _Histogram.observe: this runs for every request.
        h = stats.queue
        h.counts[bisect_left(LATENCY_BUCKETS, queue_s)] += 1
        h.sum += queue_s
        h = stats.compute
        h.counts[bisect_left(LATENCY_BUCKETS, compute_s)] += 1
        h.sum += compute_s
        h = stats.total
        h.counts[bisect_left(LATENCY_BUCKETS, total_s)] += 1
        h.sum += total_s

    def observe_requests_bulk(
        self,
        model: str,
        version: str,
        counts: dict[str, int],
        hists: list[list[int]],
        sums: list[float],
    ) -> None:
        """Record requests counted elsewhere (the router's C core): per-code counts plus
        queue, compute and total bucket counts over LATENCY_BUCKETS, and their sums."""
        stats = self._models.get(model) or self._stats(model)
        requests = stats.requests
        for code, n in counts.items():
            key = (version, code)
            requests[key] = requests.get(key, 0) + n
        for h, counts_, total in zip(
            (stats.queue, stats.compute, stats.total), hists, sums, strict=True
        ):
            for i, n in enumerate(counts_):
                h.counts[i] += n
            h.sum += total

    def observe_batch(self, model: str, size: int, count: int = 1) -> None:
        """Record ``count`` forwards of ``size`` rows each (workers report them in bulk)."""
        h = (self._models.get(model) or self._stats(model)).batch
        h.counts[bisect_left(BATCH_BUCKETS, size)] += count
        h.sum += size * count

    # -- lifecycle events (rare) -----------------------------------------------------------

    def observe_upgrade(
        self,
        model: str,
        kind: str,
        outcome: str,
        phases: Mapping[str, float],
        bytes_freed: int,
    ) -> None:
        """Record a finished upgrade/rollback/recycle/restart and its phase timings."""
        key = (model, kind, outcome)
        self._upgrades[key] = self._upgrades.get(key, 0) + 1
        for phase, seconds in phases.items():
            h = self._phases.get((model, phase))
            if h is None:
                h = self._phases[(model, phase)] = _Histogram(len(PHASE_BUCKETS))
            h.observe(PHASE_BUCKETS, seconds)
        # A counter can't go down; a negative "freed" (memory grew) is not bytes freed.
        self._bytes_freed[model] = self._bytes_freed.get(model, 0) + max(0, bytes_freed)

    def observe_worker_exit(self, model: str, reason: str) -> None:
        """Record a worker that went away (retired, crashed, hung, boot_failed, recycled)."""
        key = (model, reason)
        self._exits[key] = self._exits.get(key, 0) + 1

    def forget_model(self, model: str) -> None:
        """Drop every series of a model that is gone (unloaded, removed by a reload), so
        dashboards do not show a model that no longer exists as down."""
        self._models.pop(model, None)
        tables: tuple[dict[Any, Any], ...] = (self._upgrades, self._phases, self._exits)
        for table in tables:
            for key in [k for k in table if k[0] == model]:
                table.pop(key, None)
        self._bytes_freed.pop(model, None)

    def publish(self, snapshot: PoolSnapshot) -> None:
        """Make ``snapshot`` the source of every gauge; one reference assignment."""
        self._published = (snapshot, time.monotonic())

    # -- scrape side -----------------------------------------------------------------------

    def request_totals(self, model: str) -> RequestTotals:
        """What ``pool-ctl fleet``'s bake window compares between hosts (via the control
        command ``stats``): answers by (version, code) and the end-to-end latency buckets."""
        stats = self._models.get(model)
        if stats is None:
            return RequestTotals({}, [0] * (len(LATENCY_BUCKETS) + 1), 0.0)
        counts, total = stats.total.read()
        return RequestTotals(stats.requests.copy(), counts, total)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (version 0.0.4)."""
        return self.render_for("")[0]

    def render_for(self, accept: str) -> tuple[bytes, str]:
        """(body, content type) for a scrape with this Accept header: OpenMetrics when
        asked for, else the Prometheus text format 0.0.4 (prometheus_client decides)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


@cache
def build_labels() -> tuple[str, str, str]:
    """(gpu-pool, Python, torch) versions; torch's from its metadata (no import here)."""
    from importlib import metadata

    from pool.version import version

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = ""
    return version(), platform.python_version(), torch


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        out.append((floatToGoString(bound), running))
    out.append(("+Inf", running + counts[-1]))
    return out


class _PoolCollector:
    """Builds metric families from a PoolMetrics at scrape time."""

    def __init__(self, metrics: PoolMetrics) -> None:
        self._m = metrics
        # (model, state) pairs ever seen: they report 0 once empty instead of vanishing,
        # so `workers{state="starting"}` drops to 0 rather than going stale. Scrapes may
        # run concurrently (threaded HTTP server), hence the lock; it is never taken by
        # the loop.
        self._seen_states: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._histograms()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(
            "gpupool_requests_total",
            "Requests answered, by model, computing version ('' if none) and result code.",
            labels=["model", "version", "code"],
        )
        for model, stats in m._models.copy().items():
            for (version, code), n in stats.requests.copy().items():
                requests.add_metric([model, version, code], n)
        yield requests

        rejected = CounterMetricFamily(
            "gpupool_requests_rejected",
            "Requests refused before reaching a worker (overload, unknown or unavailable "
            "model, shutdown, malformed); also in requests_total, never in the latencies.",
            labels=["model", "code"],
        )
        for model, stats in m._models.copy().items():
            for code, n in stats.rejected.copy().items():
                rejected.add_metric([model, code], n)
        yield rejected

        upgrades = CounterMetricFamily(
            "gpupool_upgrades_total",
            "Finished version changes, by kind (upgrade|rollback|recycle|restart) and outcome.",
            labels=["model", "kind", "outcome"],
        )
        for (model, kind, outcome), n in m._upgrades.copy().items():
            upgrades.add_metric([model, kind, outcome], n)
        yield upgrades

        freed = CounterMetricFamily(
            "gpupool_upgrade_bytes_freed_total",
            "Device memory given back by retired workers after version changes.",
            labels=["model"],
        )
        for model, n in m._bytes_freed.copy().items():
            freed.add_metric([model], n)
        yield freed

        exits = CounterMetricFamily(
            "gpupool_worker_exits_total",
            "Worker processes that ended, by reason.",
            labels=["model", "reason"],
        )
        for (model, reason), n in m._exits.copy().items():
            exits.add_metric([model, reason], n)
        yield exits

    def _histograms(self) -> Iterator[Metric]:
        models = list(self._m._models.copy().items())
        specs = (
            (
                "gpupool_request_queue_seconds",
                "Time a request waited in the router queue.",
                "queue",
                LATENCY_BUCKETS,
            ),
            (
                "gpupool_request_compute_seconds",
                "Time the worker spent on the request's batch.",
                "compute",
                LATENCY_BUCKETS,
            ),
            (
                "gpupool_request_duration_seconds",
                "Time from request arrival to reply.",
                "total",
                LATENCY_BUCKETS,
            ),
            (
                "gpupool_batch_size",
                "Requests per batch dispatched to a worker.",
                "batch",
                BATCH_BUCKETS,
            ),
        )
        for name, doc, attr, bounds in specs:
            fam = HistogramMetricFamily(name, doc, labels=["model"])
            for model, stats in models:
                h: _Histogram = getattr(stats, attr)
                counts, total = h.read()
                fam.add_metric([model], _buckets(bounds, counts), total)
            yield fam

        phases = HistogramMetricFamily(
            "gpupool_upgrade_phase_seconds",
            "Duration of each phase of a version change (start, warm, validate, drain, ...).",
            labels=["model", "phase"],
        )
        for (model, phase), h in self._m._phases.copy().items():
            counts, total = h.read()
            phases.add_metric([model, phase], _buckets(PHASE_BUCKETS, counts), total)
        yield phases

    def _gauges(self) -> Iterator[Metric]:
        published = self._m._published
        if published is None:
            return
        snap, at = published

        age = GaugeMetricFamily(
            "gpupool_snapshot_age_seconds",
            "Seconds since the event loop last published its state; grows if the loop stalls.",
        )
        age.add_metric([], max(0.0, time.monotonic() - at))
        yield age

        build = GaugeMetricFamily(
            "gpupool_build_info",
            "Always 1; the labels say what runs.",
            labels=["version", "python", "torch"],
        )
        build.add_metric(list(build_labels()), 1)
        yield build

        util = GaugeMetricFamily(
            "gpupool_gpu_utilization_ratio",
            "Fraction of NVML's last sample period in which a kernel ran, per device.",
            labels=["device"],
        )
        used = GaugeMetricFamily(
            "gpupool_gpu_memory_used_bytes", "Device memory in use (NVML).", labels=["device"]
        )
        total = GaugeMetricFamily(
            "gpupool_gpu_memory_total_bytes", "Device memory in all (NVML).", labels=["device"]
        )
        for dev, (ratio, used_b, total_b) in sorted(snap.devices.items()):
            if ratio is not None:
                util.add_metric([dev], ratio)
            used.add_metric([dev], used_b)
            total.add_metric([dev], total_b)
        yield util
        yield used
        yield total

        depth = GaugeMetricFamily(
            "gpupool_queue_depth",
            "Requests waiting in the router for a worker.",
            labels=["model"],
        )
        for model, n in snap.queue_depth.items():
            depth.add_metric([model], n)
        yield depth

        up = GaugeMetricFamily(
            "gpupool_model_up",
            "1 when the model answers requests (serving or upgrading).",
            labels=["model"],
        )
        state = GaugeMetricFamily(
            "gpupool_model_state",
            "1 for the model's current lifecycle state.",
            labels=["model", "state"],
        )
        for model, st in snap.model_state.items():
            up.add_metric([model], 1 if st in _UP_STATES else 0)
            state.add_metric([model, st], 1)
        yield up
        yield state

        counts: dict[tuple[str, str], int] = {}
        for w in snap.workers:
            counts[(w.model, w.state)] = counts.get((w.model, w.state), 0) + 1
        with self._lock:
            self._seen_states.update(counts)
            # Forget models the supervisor no longer knows, or the set grows forever.
            known = {w.model for w in snap.workers} | snap.model_state.keys()
            self._seen_states = {k for k in self._seen_states if k[0] in known}
            keys = sorted(self._seen_states)
        workers = GaugeMetricFamily(
            "gpupool_workers", "Worker processes by model and state.", labels=["model", "state"]
        )
        for key in keys:
            workers.add_metric(list(key), counts.get(key, 0))
        yield workers

        labels = ["model", "version", "device", "pid"]
        gpu = GaugeMetricFamily(
            "gpupool_worker_gpu_bytes",
            "Device memory used by the worker process (NVML).",
            labels=labels,
        )
        rss = GaugeMetricFamily(
            "gpupool_worker_rss_bytes", "Resident memory of the worker process.", labels=labels
        )
        inflight = GaugeMetricFamily(
            "gpupool_worker_inflight",
            "Requests the worker is computing or holds.",
            labels=labels,
        )
        served = CounterMetricFamily(
            "gpupool_worker_served_total",
            "Requests the worker has answered (per process).",
            labels=labels,
        )
        for w in snap.workers:
            values = [w.model, w.version, w.device, str(w.pid)]
            if w.gpu_bytes is not None:
                gpu.add_metric(values, w.gpu_bytes)
            if w.rss_bytes is not None:
                rss.add_metric(values, w.rss_bytes)
            inflight.add_metric(values, w.inflight)
            served.add_metric(values, w.served)
        yield gpu
        yield rss
        yield inflight
        yield served
        yield from _standby_metrics(snap)


def _standby_metrics(snap: PoolSnapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "gpupool_standby", "Hot standby processes by device and state.", labels=["device", "state"]
    )
    gpu = GaugeMetricFamily(
        "gpupool_standby_gpu_bytes",
        "Device memory of a hot standby: its CUDA context, no model (NVML).",
        labels=["device", "pid"],
    )
    for sb in snap.standbys:
        up.add_metric([sb.device, sb.state], 1)
        if sb.gpu_bytes is not None:
            gpu.add_metric([sb.device, str(sb.pid)], sb.gpu_bytes)
    taken = CounterMetricFamily(
        "gpupool_standby_taken",
        "Workers started in a hot standby instead of a fresh process.",
        labels=["device"],
    )
    died = CounterMetricFamily(
        "gpupool_standby_died", "Hot standbys that died before being taken.", labels=["device"]
    )
    for device, n in snap.standbys_taken.items():
        taken.add_metric([device], n)
    for device, n in snap.standbys_died.items():
        died.add_metric([device], n)
    yield up
    yield gpu
    yield taken
    yield died
