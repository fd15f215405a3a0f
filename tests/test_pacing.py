"""The launch clock (workers/pacing.py): when to queue the next batch behind a running one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from workers.pacing import INITIAL_LEAD_S, SHRINK, LaunchClock, device_seconds


@dataclass
class _Stamp:
    """A timing event that completed at ``t`` seconds of device time."""

    t: float

    def elapsed_time(self, other: _Stamp) -> float:
        return (other.t - self.t) * 1000.0  # ms, as torch.cuda.Event reports it


@dataclass
class _Batch:
    rows: int
    at: float
    queued: bool = False
    start: Any = None
    event: Any = None


def test_nothing_is_predicted_before_a_batch_of_that_size_or_larger_was_seen() -> None:
    clock = LaunchClock()
    assert clock.expected(8) is None and clock.launch_at(8, 0.0) is None
    clock.completed(_Batch(8, at=10.0), None, now=10.004)
    assert clock.expected(8) == pytest.approx(0.004)
    assert clock.expected(4) == pytest.approx(0.004)  # a larger batch's time: never early
    assert clock.expected(9) is None


def test_launch_comes_before_the_running_batch_ends_by_its_cost_and_the_lead() -> None:
    clock = LaunchClock()
    clock.completed(_Batch(32, at=0.0), None, now=0.004)
    clock.launched(1.0, 1.0002)  # a launch takes 0.2 ms
    at = clock.launch_at(32, launched_at=1.0)
    assert at == pytest.approx(1.0 + 0.004 - 0.0002 - INITIAL_LEAD_S)


def test_a_batch_queued_behind_another_starts_when_that_one_ends() -> None:
    clock = LaunchClock()
    clock.completed(_Batch(16, at=0.0), None, now=0.003)  # 3 ms on an idle device
    clock.completed(_Batch(16, at=0.009), None, now=0.012)  # 3 ms again
    # Launched at 0.010, behind the batch that ended at 0.012: it ran from 0.012 on.
    assert clock.start_of(0.010) == pytest.approx(0.012)
    clock.completed(_Batch(16, at=0.010), None, now=0.015)
    assert clock.expected(16) == pytest.approx(0.003)


def test_device_timing_events_give_the_busy_time_not_the_host_view() -> None:
    clock = LaunchClock()
    # Seen complete 2 ms late (the loop was busy): the events say 3 ms.
    clock.completed(_Batch(8, at=0.0, start=_Stamp(5.0), event=_Stamp(5.003)), None, now=0.005)
    assert clock.expected(8) == pytest.approx(0.003)


def test_an_idle_gap_before_a_queued_batch_moves_launches_earlier_then_the_lead_shrinks() -> None:
    clock = LaunchClock()
    first = _Batch(8, at=0.0, start=_Stamp(1.000), event=_Stamp(1.003))
    # Queued, but its work began 0.4 ms after the first ended: launched too late.
    late = _Batch(8, at=0.002, queued=True, start=_Stamp(1.0034), event=_Stamp(1.0064))
    clock.completed(first, None, now=0.0031)
    clock.completed(late, first, now=0.0065)
    assert clock.lead_s == pytest.approx(INITIAL_LEAD_S + 0.0004) and clock.gaps == 1
    on_time = _Batch(8, at=0.005, queued=True, start=_Stamp(1.0064), event=_Stamp(1.0094))
    clock.completed(on_time, late, now=0.0095)
    assert clock.lead_s == pytest.approx((INITIAL_LEAD_S + 0.0004) * SHRINK)
    # A batch launched on an idle device says nothing about the lead.
    idle = _Batch(8, at=0.02, start=_Stamp(1.02), event=_Stamp(1.023))
    clock.completed(idle, on_time, now=0.0231)
    assert clock.lead_s == pytest.approx((INITIAL_LEAD_S + 0.0004) * SHRINK)


def test_the_lead_never_passes_half_the_running_batch() -> None:
    clock = LaunchClock()
    clock.completed(_Batch(8, at=0.0), None, now=0.004)
    clock.launched(0.0, 0.0001)
    clock.steer(0.05)  # a huge gap once (say the host stalled)
    assert clock.launch_at(8, launched_at=1.0) == pytest.approx(1.0 + 0.004 - 0.002)


def test_no_early_launch_when_launching_costs_as_much_as_running() -> None:
    clock = LaunchClock()
    clock.completed(_Batch(64, at=0.0), None, now=0.007)
    clock.launched(1.0, 1.005)  # an op-by-op forward: 5 ms of CPU for 7 ms of device
    assert clock.launch_at(64, launched_at=1.0) is None


def test_estimates_follow_the_device_smoothly() -> None:
    clock = LaunchClock()
    t = 0.0
    for _ in range(50):
        clock.completed(_Batch(64, at=t), None, now=t + 0.008)
        t += 0.1
    assert clock.expected(64) == pytest.approx(0.008)
    clock.completed(_Batch(64, at=t), None, now=t + 0.016)  # one slow batch: a fifth of it
    assert clock.expected(64) == pytest.approx(0.008 + 0.2 * 0.008)


def test_device_seconds_is_none_without_timing_events() -> None:
    assert device_seconds(None, _Stamp(1.0)) is None
    assert device_seconds(object(), object()) is None
    assert device_seconds(_Stamp(1.0), _Stamp(1.5)) == pytest.approx(0.5)
