"""When to launch the next batch so that the device never waits for the host.

A batch launched only once the previous one has completed leaves the GPU idle from that
completion until the next batch's first kernel: the completion's wake-up, the launch's
own CPU time, and whatever the serving loop was doing meanwhile. For a resnet50 batch
of 32 replayed as a CUDA graph (3.9 ms on an H100) that gap was a fifth of the time.

So the worker queues the next batch behind the running one shortly before the running
one is due to end: late enough that the requests which arrive meanwhile still join it,
early enough that the launch is queued on the device when the running batch ends. The
clock learns how long a batch of n rows keeps the device busy and how long a launch
takes, and answers "launch at".

The host sees a completion late (by however long the loop was busy elsewhere), so
predictions made from the host's view are biased. The device knows better: each batch
records a timing event when its work starts on the stream, so for a batch queued behind
another, the idle time between them is measured exactly. The clock steers its lead
with it: any idle gap is added to the lead, and while there is none the lead shrinks a
little per batch, so that batches take every request they can.

Where a launch costs the CPU about as much as the device's run (an ordinary TorchScript
forward of a small batch), nothing is queued early: batches then grow instead.
"""

from __future__ import annotations

from typing import Any, Protocol

INITIAL_LEAD_S = 0.0003  # before the first measured gap: covers the loop's reaction
GAP_TOLERANCE_S = 0.00002  # device idle this short between batches counts as none
SHRINK = 0.9  # the lead's factor per batch queued without a gap
SMOOTHING = 0.2  # weight of the newest sample in the running averages


class Timed(Protocol):
    """What the clock reads of a launched batch (``workers.pipeline.Launched``)."""

    rows: int
    at: float  # host time the launch began
    queued: bool  # launched while another batch was still running
    start: Any  # CUDA timing event recorded as the launch began (None: not measured)
    event: Any  # its completion event (timing too, on a GPU)


def device_seconds(first: Any, second: Any) -> float | None:
    """Device time between two completed timing events; None where not measurable."""
    if first is None or second is None:
        return None
    try:
        return float(first.elapsed_time(second)) / 1000.0
    except (AttributeError, RuntimeError):  # not timing events (a CPU, a test's fakes)
        return None


class LaunchClock:
    """Running estimates of device time per batch size, of launch cost, and the lead."""

    def __init__(self) -> None:
        self.busy_s: dict[int, float] = {}  # rows -> seconds the device spends on them
        self.launch_s = 0.0
        self.lead_s = INITIAL_LEAD_S
        self.last_end = 0.0  # when the previous batch's completion was seen
        self.gaps = 0  # queued launches that still left the device idle

    def launched(self, started: float, finished: float) -> None:
        """A launch took the CPU from ``started`` to ``finished``."""
        took = finished - started
        self.launch_s = took if self.launch_s == 0.0 else self._mix(self.launch_s, took)

    @staticmethod
    def _mix(old: float, new: float) -> float:
        return old + SMOOTHING * (new - old)

    def start_of(self, launched_at: float) -> float:
        """When a batch launched at ``launched_at`` got the device, as the host saw it:
        then, or when the batch ahead of it was seen to end, whichever is later."""
        return max(launched_at, self.last_end)

    def completed(self, batch: Timed, previous: Timed | None, now: float) -> None:
        """``batch`` was seen complete ``now``; ``previous`` completed just before it."""
        took = device_seconds(batch.start, batch.event)
        if took is None:
            took = now - self.start_of(batch.at)
        self.last_end = now
        if took > 0:
            old = self.busy_s.get(batch.rows)
            self.busy_s[batch.rows] = took if old is None else self._mix(old, took)
        if batch.queued and previous is not None:
            gap = device_seconds(previous.event, batch.start)
            if gap is not None:
                self.steer(gap)

    def steer(self, gap: float) -> None:
        """Adjust the lead by the device's idle time before a queued batch."""
        if gap > GAP_TOLERANCE_S:
            self.gaps += 1
            self.lead_s += gap
        else:
            self.lead_s *= SHRINK

    def expected(self, rows: int) -> float | None:
        """Device time for ``rows`` rows: measured for this size, else for the nearest
        larger size seen (an overestimate launches later, never too early); None before
        any such size was seen."""
        if rows in self.busy_s:
            return self.busy_s[rows]
        larger = [n for n in self.busy_s if n > rows]
        return self.busy_s[min(larger)] if larger else None

    def launch_at(self, rows: int, launched_at: float) -> float | None:
        """When to launch behind the running batch (``rows`` rows, launched at
        ``launched_at``); None when not to (see the module's doc)."""
        busy = self.expected(rows)
        if busy is None or self.launch_s * 2 > busy:
            return None
        lead = min(self.launch_s + self.lead_s, busy / 2)
        return self.start_of(launched_at) + busy - lead
