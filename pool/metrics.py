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
    request_queue_seconds{model}                histogram (answers that reached a worker)
    request_worker_wait_seconds{model}          histogram (timed by the worker: the wait
    request_compute_seconds{model}              histogram  before its batch, the batch)
    request_duration_seconds{model}             histogram (end to end, as queue_seconds)
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

Layout: the records the loop writes (buckets, histograms, the snapshot) are in
:mod:`pool.metrics_records`; the scrape-time families in :mod:`pool.metrics_collect`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from pool.metrics_collect import PoolCollector, build_labels
from pool.metrics_records import (
    BATCH_BUCKETS,
    LATENCY_BUCKETS,
    MAX_MODELS,
    OVERFLOW_MODEL,
    PHASE_BUCKETS,
    REJECTED,
    Histogram,
    ModelStats,
    PoolSnapshot,
    RequestTotals,
    StandbySample,
    WorkerSample,
)

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "MAX_MODELS",
    "OVERFLOW_MODEL",
    "PHASE_BUCKETS",
    "PoolMetrics",
    "PoolSnapshot",
    "RequestTotals",
    "StandbySample",
    "WorkerSample",
    "build_labels",
]


class PoolMetrics:
    """The daemon's metrics: hot-path recorders plus a private registry to scrape."""

    def __init__(self) -> None:
        self._models: dict[str, ModelStats] = {}
        self._upgrades: dict[tuple[str, str, str], int] = {}
        self._phases: dict[tuple[str, str], Histogram] = {}
        self._bytes_freed: dict[str, int] = {}
        self._exits: dict[tuple[str, str], int] = {}
        # (snapshot, monotonic publish time) in one tuple so a reader gets a matching pair.
        self._published: tuple[PoolSnapshot, float] | None = None

        # A private registry: tests and embedders can create several PoolMetrics, and
        # nothing imported elsewhere leaks into poold's endpoint.
        self.registry = CollectorRegistry()
        self.registry.register(PoolCollector(self))
        # poold's own CPU, memory and fds; cheap and useful when the loop misbehaves.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # -- hot path (event loop thread only) -------------------------------------------------

    def _stats(self, model: str) -> ModelStats:
        stats = self._models.get(model)
        if stats is None:
            if len(self._models) >= MAX_MODELS:
                model = OVERFLOW_MODEL
                stats = self._models.get(model)
            if stats is None:
                stats = self._models[model] = ModelStats()
        return stats

    def observe_request(
        self,
        model: str,
        version: str,
        code: str,
        queue_s: float,
        total_s: float,
    ) -> None:
        """Record one request the router answered itself (``version`` "" when no worker
        computed it): no worker timed it, so it has no in-worker wait or compute. The
        worker's answers come in bulk from the C core (``observe_requests_bulk``)."""
        stats = self._models.get(model) or self._stats(model)
        key = (version, code)
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        if not version and code in REJECTED:
            rejected = stats.rejected
            rejected[code] = rejected.get(code, 0) + 1
            return
        # Inlined Histogram.observe: this runs for every request.
        h = stats.queue
        h.counts[bisect_left(LATENCY_BUCKETS, queue_s)] += 1
        h.sum += queue_s
        h = stats.total
        h.counts[bisect_left(LATENCY_BUCKETS, total_s)] += 1
        h.sum += total_s

    def observe_rejected(self, model: str, code: str, n: int) -> None:
        """Record ``n`` requests the router's C core refused itself (no worker, no
        latency), as ``n`` calls of ``observe_request`` with version "" would."""
        stats = self._models.get(model) or self._stats(model)
        key = ("", code)
        stats.requests[key] = stats.requests.get(key, 0) + n
        if code in REJECTED:
            stats.rejected[code] = stats.rejected.get(code, 0) + n

    def observe_requests_bulk(
        self,
        model: str,
        version: str,
        counts: dict[str, int],
        hists: list[list[int]],
        sums: list[float],
    ) -> None:
        """Record requests counted elsewhere (the router's C core): per-code counts plus
        queue, in-worker wait, compute and total bucket counts over LATENCY_BUCKETS, and
        their sums (``router.protocol.LATENCY_HISTOGRAMS``, in that order)."""
        stats = self._models.get(model) or self._stats(model)
        requests = stats.requests
        for code, n in counts.items():
            key = (version, code)
            requests[key] = requests.get(key, 0) + n
        for h, counts_, total in zip(
            (stats.queue, stats.wait, stats.compute, stats.total), hists, sums, strict=True
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
                h = self._phases[(model, phase)] = Histogram(len(PHASE_BUCKETS))
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
