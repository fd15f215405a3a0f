"""Prometheus metric families built from a :class:`pool.metrics.PoolMetrics` at scrape
time, on the HTTP thread (see :mod:`pool.metrics` for the concurrency rules)."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from pool.metrics_records import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    PHASE_BUCKETS,
    UP_STATES,
    Histogram,
    PoolSnapshot,
)

if TYPE_CHECKING:
    from pool.metrics import PoolMetrics


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


class PoolCollector:
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
                "gpupool_request_worker_wait_seconds",
                "Time a request waited inside the worker before its batch's compute began "
                "(behind a running batch, gathering a batch); timed by the worker.",
                "wait",
                LATENCY_BUCKETS,
            ),
            (
                "gpupool_request_compute_seconds",
                "Compute time of the batch the request was in (on a GPU the device's time, "
                "from CUDA events); timed by the worker.",
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
                h: Histogram = getattr(stats, attr)
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
            up.add_metric([model], 1 if st in UP_STATES else 0)
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
    held = GaugeMetricFamily(
        "gpupool_standby_preload_bytes",
        "Host memory of the serving version a hot standby holds ahead of need (pool.preload).",
        labels=["device", "pid"],
    )
    for sb in snap.standbys:
        up.add_metric([sb.device, sb.state], 1)
        if sb.gpu_bytes is not None:
            gpu.add_metric([sb.device, str(sb.pid)], sb.gpu_bytes)
        held.add_metric([sb.device, str(sb.pid)], sb.preload_bytes)
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
    yield held
    yield taken
    yield died
