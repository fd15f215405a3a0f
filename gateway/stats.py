"""Per-protocol request counts and latencies, kept by the gateway and read by poold.

The gateway is its own process, so its numbers reach poold's Prometheus endpoint through
a small JSON snapshot that it rewrites atomically (write, then rename) about once a
second; ``gateway.collector`` turns the snapshots into metric families at scrape time.
The hot path only bumps ints in dicts.
"""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_left
from typing import Any, Final

# Seconds; the same spirit as pool.metrics.LATENCY_BUCKETS, finer at the low end.
BUCKETS: Final = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0)


class Stats:
    def __init__(self, path: str = "") -> None:
        self.path = path
        self.requests: dict[tuple[str, str, str], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.inflight: dict[str, int] = {}
        self.now = time.perf_counter

    def begin(self, protocol: str) -> None:
        self.inflight[protocol] = self.inflight.get(protocol, 0) + 1

    def end(self, protocol: str, model: str, code: str, t0: float) -> None:
        elapsed = self.now() - t0
        self.inflight[protocol] -= 1
        key = (protocol, model[:64], code)
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.buckets.get(protocol)
        if counts is None:
            counts = self.buckets[protocol] = [0] * (len(BUCKETS) + 1)
        counts[bisect_left(BUCKETS, elapsed)] += 1
        self.sums[protocol] = self.sums.get(protocol, 0.0) + elapsed

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "requests": [[*k, v] for k, v in self.requests.items()],
            "buckets": list(BUCKETS),
            "latency": {k: [v, self.sums.get(k, 0.0)] for k, v in self.buckets.items()},
            "inflight": dict(self.inflight),
        }

    def write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.snapshot(), fh)
        os.replace(tmp, self.path)
