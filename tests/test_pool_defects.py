"""Defects found by reading pool/ (issue 16), each reproduced in-process, no worker process.

- a drain-first upgrade whose restore fails was reported ``rolled_back``;
- a ``ready`` with no ``phase: warming`` before it raised IllegalTransition in the loop;
- retiring a GPU worker asked NVML on every loop turn, and "settled" meant two equal
  readings one turn apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_boot_reason import loading
from upgradekit import FakeClock, FakeSupervisor, run

from pool.lifecycle import TRANSITIONS, WorkerRecord, WorkerState
from pool.state import Deployed
from pool.tasks import Scheduler, Wait
from pool.upgrade import SETTLE_EVERY_S, Upgrade
from pool.upgrade_phases import UpgradePhase
from pool.upgrade_result import Restore

V2 = Deployed("2", "/models/m/2.pt", "d2")


def upgrade(sup: FakeSupervisor, strategy: str) -> Upgrade:
    return Upgrade(sup, sup.rt, V2, strategy, 60.0, "upgrade", lambda *a, **k: None)  # type: ignore[arg-type]


def test_a_failed_restore_is_not_reported_as_rolled_back() -> None:
    # Two devices, drain-first: slot 0 takes version 2, slot 1's new worker fails, and
    # version 1 will not boot again on slot 1 either (its file went bad meanwhile).
    def fate(rec: WorkerRecord) -> bool:
        return rec.slot == 0 or rec.generation == 3  # 3: a generation that never comes

    sup = FakeSupervisor(("cpu", "cpu"), fate)
    result = run(sup, upgrade(sup, "drain-first").run(), FakeClock())
    assert not result.ok
    assert result.outcome is UpgradePhase.RESTORE_FAILED, result.outcome
    assert result.restore is not None and result.restore.ok is False
    assert "would not load" in result.restore.reason
    assert sup.store.outcomes == ["restore_failed"]
    assert sup.store.extra[0]["restore"] == result.to_json()["restore"]


def test_a_failure_whose_restore_works_is_rolled_back() -> None:
    sup = FakeSupervisor(("cpu", "cpu"), lambda rec: rec.slot == 0 or rec.generation == 1)
    result = run(sup, upgrade(sup, "drain-first").run(), FakeClock())
    assert result.outcome is UpgradePhase.ROLLED_BACK
    assert result.restore == Restore(True, "")
    serving = [w for w in sup.rt.alive() if w.state is WorkerState.READY]
    assert sorted(w.slot for w in serving) == [0, 1] and {w.version for w in serving} == {"1"}


def test_ready_without_a_warming_phase_is_served(tmp_path: Path) -> None:
    # The table is the one judge: the event handler asks it instead of its own list.
    core, rec = loading(tmp_path)
    assert rec.state is WorkerState.LOADING
    core.says(rec, t="ready", timings={})
    assert rec.state is WorkerState.READY
    core.says(rec, t="ready", timings={})  # said twice
    assert rec.state is WorkerState.READY


def test_every_booting_state_may_become_ready() -> None:
    for state in (WorkerState.LOADING, WorkerState.WARMING, WorkerState.VALIDATING):
        assert WorkerState.READY in TRANSITIONS[state], state


class _Gpu:
    """NVML as it looks while a retired worker's 1 GiB comes back: the process is gone at
    once, but the used count keeps falling for ``settling_s``."""

    def __init__(self, clock: FakeClock, settling_s: float) -> None:
        self.clock = clock
        self.settle_at: float | None = None  # set when the worker is retired
        self.settling_s = settling_s
        self.queries = 0

    def used(self) -> int:
        self.queries += 1
        if self.settle_at is None:
            return 5 << 30
        left = max(0.0, self.settle_at - self.clock.now) / self.settling_s
        return (4 << 30) + int(left * (1 << 30))

    def process_bytes(self, idx: int) -> dict[int, int]:
        self.queries += 1
        return {}


def test_retire_samples_nvml_at_its_own_period_not_every_loop_turn() -> None:
    clock = FakeClock()
    gpu = _Gpu(clock, settling_s=1.0)
    sup = FakeSupervisor(("cuda:0",), lambda rec: True)
    sup.gpu = gpu  # type: ignore[assignment]
    sup.device_level = lambda device: gpu.used()  # type: ignore[method-assign]
    retire = sup.retire

    def retire_and_start_settling(rec: WorkerRecord) -> None:
        retire(rec)
        if gpu.settle_at is None:
            gpu.settle_at = clock.now + gpu.settling_s

    sup.retire = retire_and_start_settling  # type: ignore[method-assign]
    result = run(sup, upgrade(sup, "surge").run(), clock, step_s=0.001)  # a 1 ms loop turn
    assert result.ok, result
    # Asked every loop turn, NVML would see ~1000 queries over the settling second, and
    # readings 1 ms apart; at SETTLE_EVERY_S, a handful.
    assert gpu.queries <= 4 + 2 / SETTLE_EVERY_S, gpu.queries
    assert result.bytes_freed == {"cuda:0": 1 << 30}  # read after the count settled


def test_a_wait_is_asked_once_per_period() -> None:
    clock = FakeClock()
    asked: list[float] = []

    def cond() -> bool:
        asked.append(clock.now)
        return False

    def op() -> Any:
        yield Wait(cond, 1.0, "test", every_s=0.25)
        return "done"

    results: list[Any] = []
    scheduler = Scheduler(clock=clock)
    scheduler.start("t", op(), results.append)
    for _ in range(1100):
        clock.now += 0.001
        scheduler.poll()
    assert 4 <= len(asked) <= 6, asked  # at 0, .25, .5, .75 and the deadline
    assert results == ["done"]
