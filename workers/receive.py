"""Taking requests into a gather: down the lane first, then from the backend socket,
without blocking, until the gather is full, nothing waits, or the running batch is done.

A control message among them is read here too; a "stop" is handed back to the serving
loop (``workers.serve``), which answers what it holds and ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from router import protocol as p
from router.frames import recv_frames
from workers.intake import Intake
from workers.lane import Lane, LaneError
from workers.pipeline import Gather, Launched
from workers.replies import Replier

log = logging.getLogger(__name__)


class Receiver:
    def __init__(self, wid: str, sock: zmq.Socket[Any], intake: Intake, replies: Replier) -> None:
        self.wid = wid
        self.sock = sock
        self.intake = intake
        self.replies = replies

    def take(
        self,
        gather: Gather,
        max_batch: int,
        running: Launched | None,
        stage_on_arrival: bool,
    ) -> bool:
        """Receive what waits (see ``receive``); the copies it staged start meanwhile.
        True when a "stop" came among it."""
        try:
            return self.receive(gather, max_batch, running, stage_on_arrival)
        finally:
            gather.stager.flush()

    def receive(
        self,
        gather: Gather,
        max_batch: int,
        running: Launched | None,
        stage_on_arrival: bool,
    ) -> bool:
        """Receive what is waiting, without blocking, until the gather is full or the
        running batch has completed (the device must not wait while requests are read:
        the completion thread's wake-up needs the GIL, which this loop holds)."""
        sock = self.sock
        stager = gather.stager if stage_on_arrival else None
        requests = gather.requests
        event = running.event if running is not None else None
        lane = self.replies.lane
        lane = lane if lane is not None and lane.open else None
        stop = False
        while gather.rows < max_batch:
            if event is not None and event.query():
                return stop
            frames: list[Any] | None = None
            if lane is not None:
                frames = self.from_lane(lane)
                if frames is None:
                    lane = None  # nothing more there for now
            via_lane = frames is not None
            if frames is None:
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    return stop
            kind = frames[0].bytes
            if kind == p.KIND_REQUEST and len(frames) >= 3:
                pending = self.intake.decode(frames, stager)
                if pending is not None:
                    if not requests:
                        gather.since = time.monotonic()
                    requests.append(pending)
                    gather.rows += pending.layout.size
                    if via_lane:
                        self.replies.lane_keys.add(pending.key)  # answered the same way
            elif kind == p.KIND_CONTROL:
                stop = is_stop(frames) or stop
        return stop

    def from_lane(self, lane: Lane) -> list[Any] | None:
        try:
            return lane.recv()
        except LaneError as exc:  # only a router bug sends that: the backend socket only
            log.error("worker %s: closing the lane: %s", self.wid, exc)
            lane.close()
            return None


def is_stop(frames: list[Any]) -> bool:
    """Whether a control message is poold's "stop" (an unreadable one is not)."""
    try:
        msg = p.unpack_map(frames[1].buffer) if len(frames) > 1 else {}
    except p.ProtocolError:
        return False
    return bool(msg.get("t") == "stop")
