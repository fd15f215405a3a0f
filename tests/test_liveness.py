"""pool.liveness with the CPU clock mocked: silence plus CPU use is busy, silence
without it is hung, a beat resets the baseline."""

from __future__ import annotations

import pytest

from pool import liveness
from pool.liveness import CpuProgress


@pytest.fixture()
def cpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, float | None]:
    clock: dict[str, float | None] = {"s": 100.0}
    monkeypatch.setattr(liveness, "cpu_seconds", lambda pid: clock["s"])
    return clock


def test_a_silent_worker_using_cpu_stays_alive(cpu: dict[str, float | None]) -> None:
    p = CpuProgress()
    assert p.last_sign_of_life(1, 10.0, 12.0) == 10.0  # baseline: nothing known yet
    for t in (12.5, 13.0, 13.5, 14.0):
        cpu["s"] = (cpu["s"] or 0) + 0.5  # one core busy
        assert p.last_sign_of_life(1, 10.0, t) == t


def test_a_silent_idle_worker_is_not_alive_since_its_beat(cpu: dict[str, float | None]) -> None:
    p = CpuProgress()
    p.last_sign_of_life(1, 10.0, 12.0)
    cpu["s"] = (cpu["s"] or 0) + 0.01  # a timer thread waking: far below a quarter core
    assert p.last_sign_of_life(1, 10.0, 12.6) == 10.0
    assert p.last_sign_of_life(1, 10.0, 16.0) == 10.0


def test_computing_then_stuck_is_measured_from_the_last_progress(
    cpu: dict[str, float | None],
) -> None:
    p = CpuProgress()
    p.last_sign_of_life(1, 10.0, 12.0)
    cpu["s"] = (cpu["s"] or 0) + 0.5
    assert p.last_sign_of_life(1, 10.0, 12.5) == 12.5
    assert p.last_sign_of_life(1, 10.0, 13.1) == 12.5  # no CPU since: the clock runs on
    assert p.last_sign_of_life(1, 10.0, 20.0) == 12.5


def test_a_beat_starts_a_new_baseline(cpu: dict[str, float | None]) -> None:
    p = CpuProgress()
    p.last_sign_of_life(1, 10.0, 12.0)
    cpu["s"] = (cpu["s"] or 0) + 5.0  # used before the beat: does not count after it
    assert p.last_sign_of_life(1, 20.0, 22.0) == 20.0
    assert p.last_sign_of_life(1, 20.0, 22.6) == 20.0


def test_a_vanished_process_shows_no_life(cpu: dict[str, float | None]) -> None:
    p = CpuProgress()
    p.last_sign_of_life(1, 10.0, 12.0)
    cpu["s"] = None
    assert p.last_sign_of_life(1, 10.0, 12.6) == 10.0
    assert p.last_sign_of_life(1, 10.0, 13.2) == 10.0
