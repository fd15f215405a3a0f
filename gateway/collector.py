"""poold's view of its gateways' numbers: a Prometheus collector over their snapshots.

Imports neither grpc nor the gateway's servers, so poold loads it cheaply. Families::

    gpupool_oip_requests_total{protocol,model,code}   counter
    gpupool_oip_request_seconds{protocol}             histogram (arrival to answer)
    gpupool_oip_inflight{protocol}                    gauge
    gpupool_oip_gateway_restarts_total{protocol}      counter
    gpupool_oip_gateway_up{protocol}                  gauge (processes running)
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString


class OipCollector:
    def __init__(self, directory: str, supervision: Callable[[], dict[str, tuple[int, int]]]):
        """``supervision()``: {protocol: (processes running, restarts)} from poold."""
        self.directory = directory
        self.supervision = supervision

    def _snapshots(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for path in sorted(glob.glob(os.path.join(self.directory, "oip-*.json"))):
            protocol = os.path.basename(path)[4:-5]
            try:
                with open(path, encoding="utf-8") as fh:
                    yield protocol, json.load(fh)
            except (OSError, ValueError):
                continue  # a gateway that never wrote one, or a partial copy: skip

    def collect(self) -> Iterator[Metric]:
        # Several processes may serve one protocol (oip_processes): sum their numbers so
        # that each series appears once.
        counts: dict[tuple[str, str, str], float] = {}
        hist: dict[str, tuple[list[float], list[float], float]] = {}
        busy: dict[str, float] = {}
        for _name, snap in self._snapshots():
            for row in snap.get("requests", []):
                key = (str(row[0]), str(row[1]), str(row[2]))
                counts[key] = counts.get(key, 0.0) + float(row[3])
            bounds = [float(b) for b in snap.get("buckets", [])]
            for proto, (buckets, total) in (snap.get("latency") or {}).items():
                seen = hist.get(proto)
                if seen is None or seen[0] != bounds:
                    hist[proto] = (bounds, [float(c) for c in buckets], float(total))
                else:
                    summed = [a + float(b) for a, b in zip(seen[1], buckets, strict=False)]
                    hist[proto] = (bounds, summed, seen[2] + float(total))
            for proto, n in (snap.get("inflight") or {}).items():
                busy[proto] = busy.get(proto, 0.0) + float(n)
        requests = CounterMetricFamily(
            "gpupool_oip_requests",
            "OIP inference requests answered",
            labels=["protocol", "model", "code"],
        )
        for key, value in sorted(counts.items()):
            requests.add_metric(list(key), value)
        latency = HistogramMetricFamily(
            "gpupool_oip_request_seconds", "OIP inference time in the gateway", labels=["protocol"]
        )
        for proto, (bounds, buckets, total) in sorted(hist.items()):
            running, cumulative = 0.0, []
            for bound, count in zip([*bounds, float("inf")], buckets, strict=False):
                running += count
                cumulative.append((floatToGoString(bound), running))
            latency.add_metric([proto], cumulative, total)
        inflight = GaugeMetricFamily(
            "gpupool_oip_inflight", "OIP requests in the gateway now", labels=["protocol"]
        )
        for proto, n in sorted(busy.items()):
            inflight.add_metric([proto], n)
        up = GaugeMetricFamily(
            "gpupool_oip_gateway_up",
            "gateway processes running (oip_processes of them when all is well)",
            labels=["protocol"],
        )
        restarts = CounterMetricFamily(
            "gpupool_oip_gateway_restarts",
            "gateway processes restarted after an exit",
            labels=["protocol"],
        )
        for protocol, (running_now, count) in self.supervision().items():
            up.add_metric([protocol], float(running_now))
            restarts.add_metric([protocol], float(count))
        yield from (requests, latency, inflight, up, restarts)
