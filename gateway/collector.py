"""poold's view of its gateways' numbers: a Prometheus collector over their snapshots.

Imports neither grpc nor the gateway's servers, so poold loads it cheaply. Families::

    gpupool_oip_requests_total{protocol,model,code}   counter
    gpupool_oip_request_seconds{protocol}             histogram (arrival to answer)
    gpupool_oip_inflight{protocol}                    gauge
    gpupool_oip_gateway_restarts_total{protocol}      counter
    gpupool_oip_gateway_up{protocol}                  gauge
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
    def __init__(self, directory: str, supervision: Callable[[], dict[str, tuple[bool, int]]]):
        """``supervision()``: {protocol: (up, restarts)} from poold's gateway supervisor."""
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
        requests = CounterMetricFamily(
            "gpupool_oip_requests",
            "OIP inference requests answered",
            labels=["protocol", "model", "code"],
        )
        latency = HistogramMetricFamily(
            "gpupool_oip_request_seconds", "OIP inference time in the gateway", labels=["protocol"]
        )
        inflight = GaugeMetricFamily(
            "gpupool_oip_inflight", "OIP requests in the gateway now", labels=["protocol"]
        )
        for _name, snap in self._snapshots():
            for row in snap.get("requests", []):  # one file per gateway process
                requests.add_metric([str(row[0]), str(row[1]), str(row[2])], float(row[3]))
            bounds = snap.get("buckets", [])
            for proto, (counts, total) in (snap.get("latency") or {}).items():
                running, buckets = 0, []
                for bound, count in zip([*bounds, float("inf")], counts, strict=False):
                    running += count
                    buckets.append((floatToGoString(bound), float(running)))
                latency.add_metric([proto], buckets, total)
            for proto, n in (snap.get("inflight") or {}).items():
                inflight.add_metric([proto], float(n))
        up = GaugeMetricFamily(
            "gpupool_oip_gateway_up", "1 while the gateway process runs", labels=["protocol"]
        )
        restarts = CounterMetricFamily(
            "gpupool_oip_gateway_restarts",
            "gateway processes restarted after an exit",
            labels=["protocol"],
        )
        for protocol, (alive, count) in self.supervision().items():
            up.add_metric([protocol], 1.0 if alive else 0.0)
            restarts.add_metric([protocol], float(count))
        yield from (requests, latency, inflight, up, restarts)
