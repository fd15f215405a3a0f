"""Prometheus families for the frontend's door (``router.door``), read at scrape time.

frontend_connections            gauge    open client connections
frontend_connection_limit       gauge    max_connections in force
frontend_full                   gauge    1 while new connections are refused
frontend_refused_total          counter  connections closed because they came past the limit
frontend_accept_failed_total    counter  accepts that failed inside libzmq (EMFILE, ...)
frontend_peers                  gauge    connections holding a request or an unread reply
frontend_unread_reply_bytes     gauge    reply bytes held for clients that have not read them
frontend_unread_reply_max_bytes gauge    the most one connection holds
frontend_peers_over_cap         gauge    connections past max_unread_reply_mb (refused)
frontend_dropped_total{reason}  counter  requests dropped unanswered: "unread" (their
                                         connection reads nothing), "gone" (it left)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from router.door import DoorStats
from router.fastlane import PeerStats


class DoorCollector:
    """Reads the door's latest stats (a NamedTuple swapped in by the loop)."""

    def __init__(
        self,
        read: Callable[[], DoorStats | None],
        peers: Callable[[], PeerStats | None] = lambda: None,
    ) -> None:
        self._read = read
        self._peers = peers

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
        peers = self._peers()
        if peers is None:
            return
        yield GaugeMetricFamily(
            "gpupool_frontend_peers",
            "Client connections holding a request or an unread reply",
            value=peers.peers,
        )
        yield GaugeMetricFamily(
            "gpupool_frontend_unread_reply_bytes",
            "Reply bytes held for clients that have not read them (payload + 64 a frame)",
            value=peers.held,
        )
        yield GaugeMetricFamily(
            "gpupool_frontend_unread_reply_max_bytes",
            "The most unread reply bytes one connection holds",
            value=peers.most,
        )
        yield GaugeMetricFamily(
            "gpupool_frontend_peers_over_cap",
            "Connections past max_unread_reply_mb, whose requests are refused",
            value=peers.over,
        )
        dropped = CounterMetricFamily(
            "gpupool_frontend_dropped",
            "Requests dropped unanswered: their connection reads nothing, or left",
            labels=["reason"],
        )
        dropped.add_metric(["unread"], peers.dropped_unread)
        dropped.add_metric(["gone"], peers.dropped_gone)
        yield dropped
