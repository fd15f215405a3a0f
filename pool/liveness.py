"""Is a silent worker hung, or busy? Its heartbeat, then its CPU time.

The worker's serving loop stamps the heartbeat (``workers.serve``), so a forward that
never returns shows up as silence. Silence alone cannot tell a hung worker from one in a
long forward on the CPU (the loop beats only between batches), which is why the timeout
used to be 30 s. Here a worker silent for a couple of beats has its CPU time sampled from
/proc: a worker that keeps using CPU is computing and is left alone (a forward that runs
past its requests' deadlines is still caught: the router's overdue check,
``request_grace_s`` past a deadline); one that is silent and uses no CPU for
``heartbeat_timeout_s`` (stopped, deadlocked, stuck in a syscall) is hung. That lets the
timeout be seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

SAMPLE_EVERY_S = 0.5
# The share of one core a silent worker must use to count as computing: a stopped or
# deadlocked one uses none, a forward at least one core; a helper thread waking now and
# then (an allocator, a timer) stays far below.
MIN_CPU_SHARE = 0.25


@dataclass
class CpuProgress:
    """When a silent worker last showed a sign of life, from samples of its CPU time."""

    sampled_at: float = 0.0
    cpu_s: float | None = None
    moved_at: float = 0.0

    def due(self, last_heartbeat: float, now: float) -> bool:
        """Whether a CPU sample is wanted now (the supervisor asks the shell for one)."""
        return (
            self.sampled_at < last_heartbeat
            or self.cpu_s is None
            or now - self.sampled_at >= SAMPLE_EVERY_S
        )

    def observe(self, cpu: float | None, last_heartbeat: float, now: float) -> None:
        """A sample of the worker's CPU seconds (None: the process is gone), taken now."""
        if self.sampled_at < last_heartbeat or self.cpu_s is None:
            # A beat came since the last sample (or none was taken): a new baseline. The
            # CPU used between the beat and now is not known, so it does not count.
            self.moved_at = last_heartbeat
        elif cpu is not None and cpu - self.cpu_s >= MIN_CPU_SHARE * (now - self.sampled_at):
            self.moved_at = now
        self.cpu_s = cpu
        self.sampled_at = now

    def alive_at(self, last_heartbeat: float) -> float:
        """The later of the last heartbeat and the last time the worker was seen using CPU."""
        return max(last_heartbeat, self.moved_at)

    def last_sign_of_life(self, pid: int | None, last_heartbeat: float, now: float) -> float:
        """``alive_at``, sampling ``pid`` from /proc first when due (the shell's way)."""
        if self.due(last_heartbeat, now):
            self.observe(cpu_seconds(pid), last_heartbeat, now)
        return self.alive_at(last_heartbeat)


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads); None if it is gone."""
    if pid is None:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(t.user + t.system)
