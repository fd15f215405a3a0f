"""What poold's metrics record: bucket bounds, the loop's counters, and the snapshot of
gauge values it publishes. Plain data, no prometheus_client: :mod:`pool.metrics` writes
these on the loop's hot path and :mod:`pool.metrics_collect` reads them at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

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
UP_STATES = frozenset({"serving", "upgrading"})

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
    preload_bytes: int = 0  # the serving version it holds in host memory (pool.preload)


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


class Histogram:
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


class ModelStats:
    """Everything recorded per model, reached with one dict lookup on the hot path."""

    __slots__ = ("requests", "rejected", "queue", "wait", "compute", "total", "batch")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (version, code) -> count
        self.rejected: dict[str, int] = {}  # code -> count
        self.queue = Histogram(len(LATENCY_BUCKETS))
        # Timed by the worker: from its receipt of the request to its batch's start, and
        # the batch's compute (the device's time on a GPU).
        self.wait = Histogram(len(LATENCY_BUCKETS))
        self.compute = Histogram(len(LATENCY_BUCKETS))
        self.total = Histogram(len(LATENCY_BUCKETS))
        self.batch = Histogram(len(BATCH_BUCKETS))
