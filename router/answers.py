"""The error answers the router gives itself, and the count of replies nobody received.

Two kinds: requests the C core holds (``fail``: one call for them all, C composes each
reply from one template and nothing is read back per request), and requests Python
judged itself and refused (``refuse``, sent from Python). Each answer is reported to the
request observer, so the metrics count it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zmq

from router import fastlane as fl
from router import protocol as p
from router.frames import NOBLOCK, send_frames
from router.stats import RequestObserver
from router.table import ModelRoute, WorkerSlot

log = logging.getLogger(__name__)


class Answers:
    """Answers for one router. ``route_at`` and ``slot_at`` are the router's own maps
    from C's row numbers to its routes and workers (read, never changed, here)."""

    def __init__(
        self,
        core: fl.Core,
        frontend: zmq.Socket[Any],
        observe: RequestObserver | None,
        route_at: Mapping[int, ModelRoute],
        slot_at: Mapping[int, WorkerSlot],
    ) -> None:
        self.core = core
        self.frontend = frontend
        self.observe = observe
        self.route_at = route_at
        self.slot_at = slot_at
        self.dropped = 0  # replies Python composed that could not be delivered

    def fail(
        self, keys: Sequence[int], code: str, message: str, *, forget: bool, now: float = 0.0
    ) -> None:
        """Answer, with one error, requests the C core holds: one call for them all (C
        composes each reply from the template; nothing is read back per request)."""
        if not keys:
            return
        infos = self.core.fail(keys, p.error_map(code, message), forget=forget)
        now = now or time.monotonic()
        for info in infos:
            if info.delivered == p.NO_SUCH_REQUEST:
                continue
            if info.delivered == p.UNDELIVERED:
                self.dropped += 1
            if self.observe is not None:
                route = self.route_at.get(info.model)
                slot = self.slot_at.get(info.worker)
                model = route.name if route is not None else ""
                version = slot.version if slot is not None else ""
                # Never dispatched (worker -1): it spent all its time in the queue.
                left_queue = now if info.worker < 0 else info.dispatched
                self.observe(model, version, code, left_queue - info.arrived, now - info.arrived)

    def refuse(self, envelope: list[bytes], model: str, code: str, header: bytes) -> None:
        """Count a request Python refused (no version computed it, no time spent) and send
        its error ``header`` back to the client."""
        if self.observe is not None:
            self.observe(model, "", code, 0.0, 0.0)
        self.send_client(envelope, header)

    def send_client(self, envelope: list[bytes], header: bytes) -> None:
        try:
            send_frames(self.frontend, [*envelope, p.PROTOCOL, header], NOBLOCK)
        except zmq.ZMQError as exc:
            self.dropped += 1
            log.debug("reply not delivered: %s", exc)


def unread_error(per_peer: int, total: int) -> bytes:
    """The error a request is refused with while its connection leaves replies unread."""
    return p.error_map(
        p.OVERLOADED,
        f"this connection has not read its replies: past {per_peer >> 20} MiB unread for "
        f"one connection (max_unread_reply_mb) or {total >> 20} MiB for all "
        "(max_unread_reply_total_mb) new requests are refused; read, then retry",
    )
