"""Prometheus families for the frontend's door (``router.door``), read at scrape time.

frontend_connections            gauge    open client connections
frontend_connection_limit       gauge    max_connections in force
frontend_full                   gauge    1 while new connections are refused
frontend_refused_total          counter  connections closed because they came past the limit
frontend_accept_failed_total    counter  accepts that failed inside libzmq (EMFILE, ...)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.door import DoorStats


class DoorCollector:
    """Reads the door's latest stats (a NamedTuple swapped in by the loop)."""

    def __init__(self, read: Callable[[], DoorStats | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "gpupool_frontend_connections", "Open client connections", value=stats.open
        )
        yield GaugeMetricFamily(
            "gpupool_frontend_connection_limit", "max_connections in force", value=stats.limit
        )
        yield GaugeMetricFamily(
            "gpupool_frontend_full", "1 while new connections are refused", value=int(stats.full)
        )
        yield CounterMetricFamily(
            "gpupool_frontend_refused",
            "Connections closed because they came past max_connections",
            value=stats.refused,
        )
        yield CounterMetricFamily(
            "gpupool_frontend_accept_failed",
            "Accepts that failed inside libzmq (descriptor table full, ...)",
            value=stats.accept_failed,
        )
