"""The watch window after a switch: our canary inside one host.

Once the routing table points at the new generation, the old one is kept (ready, out
of the table) until the new one has answered ``watch_requests`` requests or
``watch_s`` seconds have passed, whichever comes first. Counts come from the workers'
heartbeats (answers and ``MODEL_ERROR`` replies since they started). If in that window
the new version's error rate is far above the old one's (at least
``WATCH_MIN_ERRORS`` errors and a rate ``WATCH_RATE_MARGIN`` above the old version's
lifetime rate, e.g. every request ``MODEL_ERROR``), the table is switched back and the
upgrade rolls back. Nothing but the new version's own failed answers is lost: the old
workers never stopped.

drain-first cannot keep the old worker of a device it has replaced; it watches after
its first device switched, while the other devices still run the old version (with one
device the old version is started again, as after a failed start).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

from pool.lifecycle import WorkerRecord
from pool.tasks import Wait

__all__ = ["WATCH_MIN_ERRORS", "WATCH_RATE_MARGIN", "WatchResult", "watch"]

WATCH_MIN_ERRORS = 5
WATCH_RATE_MARGIN = 0.5


@dataclass(frozen=True)
class WatchResult:
    answered: int
    errors: int
    seconds: float
    old_rate: float
    failed: str = ""  # why the new version was rolled back; "" = it passed

    def note(self) -> str:
        return (
            f"{self.answered} answered, {self.errors} MODEL_ERROR in {self.seconds:.2f}s "
            f"(old version's rate {self.old_rate:.1%})"
        )


def _counts(recs: list[WorkerRecord]) -> tuple[int, int]:
    return sum(r.answered for r in recs), sum(r.model_errors for r in recs)


def _verdict(answered: int, errors: int, old_rate: float) -> bool:
    """True when the new version fails far more often than the old one."""
    return errors >= WATCH_MIN_ERRORS and errors / max(1, answered) >= old_rate + WATCH_RATE_MARGIN


def watch(
    new: list[WorkerRecord],
    old: list[WorkerRecord],
    requests: int,
    seconds: float,
    say: Callable[..., None],
    clock: Callable[[], float],
) -> Generator[Wait, bool, WatchResult]:
    """Watch ``new`` (serving) against ``old`` (kept); see the module docstring. ``clock``
    is the core's (``Supervisor.clock``)."""
    old_answered, old_errors = _counts(old)
    old_rate = old_errors / old_answered if old_answered else 0.0
    base_answered, base_errors = _counts(new)  # warm-up and probes are not answers
    t0 = clock()
    end = t0 + seconds
    say("watching", requests=requests, seconds=seconds)
    while True:
        answered, errors = _counts(new)
        answered -= base_answered
        errors -= base_errors
        elapsed = clock() - t0
        if _verdict(answered, errors, old_rate):
            why = (
                f"watch: {errors} of {answered} requests to the new version failed "
                f"(MODEL_ERROR) within {elapsed:.2f}s of the switch; the old version's rate "
                f"is {old_rate:.1%}"
            )
            return WatchResult(answered, errors, elapsed, old_rate, why)
        if not any(r.alive for r in new):
            why = "watch: every worker of the new version exited within the watch window"
            return WatchResult(answered, errors, elapsed, old_rate, why)
        if answered >= requests or elapsed >= seconds:
            return WatchResult(answered, errors, elapsed, old_rate)
        seen = (answered + base_answered, errors + base_errors)

        def moved(seen: tuple[int, int] = seen) -> bool:
            return _counts(new) != seen

        yield Wait(moved, max(0.0, end - clock()), "watch")
