"""The retire proof's reference level across consecutive upgrades, with fake NVML samples.

A ``LedgerGpu`` plays the device: every live worker holds a CUDA context, a worker that has
loaded also holds its model, and a worker held for staging (``hold``) counts as a bare
context, as in ``pool.standby.device_level``. The upgrades run under the real
``pool.upgrade.Upgrade`` (tests/upgradekit.py). The second drain-first upgrade is the case
the GPU caught: its old worker was spawned while the first generation still served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from upgradekit import FakeClock, FakeSupervisor, run

from pool.lifecycle import WorkerRecord, WorkerState
from pool.state import Deployed
from pool.upgrade import HELD_EVERY_S, Upgrade

MiB = 1 << 20
BASE, CTX, MODEL = 600 * MiB, 500 * MiB, 1740 * MiB


@dataclass
class LedgerGpu:
    workers: list[WorkerRecord] = field(default_factory=list)
    queries: int = 0

    def process_bytes(self, idx: int) -> dict[int, int] | None:
        self.queries += 1
        return {
            w.pid: CTX + (0 if w.holding else MODEL)
            for w in self.workers
            if w.alive and w.pid is not None
        }

    def memory(self, idx: int) -> tuple[int, int] | None:
        return BASE + sum((self.process_bytes(idx) or {}).values()), 140 << 30


class _Standbys:
    def available(self, device: str) -> bool:
        return True


class LedgerSupervisor(FakeSupervisor):
    """Stages a held worker (it waits LOADING until released) and reads the level as
    ``StandbyUse.device_level`` does: used minus the bare contexts."""

    def __init__(self, standby: bool) -> None:
        self.ledger = LedgerGpu()
        self.standby = standby
        self.standbys = _Standbys()
        super().__init__(("cuda:0",), lambda rec: True)
        self.gpu = self.ledger  # type: ignore[assignment]
        self.ledger.workers = self.rt.workers
        self.time = FakeClock()
        self.exited_at = self.released_at = 0.0

    def retire(self, rec: WorkerRecord) -> None:
        super().retire(rec)
        self.exited_at = self.time.now

    def spawn(self, rt, gen, slot, hold=False):  # type: ignore[no-untyped-def]
        level = self.device_level(rt.devices[slot]) if hasattr(self, "ledger") else None
        if not hold:
            rec = super().spawn(rt, gen, slot)
            rec.device_used_at_spawn = level
            return rec
        self.activations, saved = None, self.activations  # type: ignore[assignment]
        rec = super().spawn(rt, gen, slot)
        self.activations = saved
        rec.device_used_at_spawn = level
        rec.holding = True
        for state in (WorkerState.STARTING, WorkerState.LOADING):
            rec.to(state)
        rec.staged = True
        return rec

    def release(self, rec: WorkerRecord) -> None:
        self.released_at = self.time.now
        rec.holding = False
        rec.to(WorkerState.WARMING)
        rec.to(WorkerState.READY)

    def device_level(self, device: str) -> int | None:
        mem = self.ledger.memory(0)
        procs = self.ledger.process_bytes(0) or {}
        bare = sum(procs.get(w.pid, 0) for w in self.rt.workers if w.holding and w.alive)
        return None if mem is None else mem[0] - bare

    def takes_standby(self, rt, device):  # type: ignore[no-untyped-def]
        return self.standby


def upgrade_to(sup: LedgerSupervisor, version: str, strategy: str) -> Upgrade:
    target = Deployed(version, f"/models/m/{version}.pt", f"d{version}")
    up = Upgrade(sup, sup.rt, target, strategy, 60.0, "upgrade", lambda *a, **k: None)  # type: ignore[arg-type]
    run(sup, up.run(), sup.time)
    return up


@pytest.mark.parametrize(
    "standby,strategies",
    [
        (True, ["drain-first", "drain-first", "drain-first"]),
        (True, ["surge", "drain-first", "surge", "drain-first"]),
        (False, ["surge", "drain-first"]),
    ],
)
def test_every_retire_proof_holds_upgrade_after_upgrade(
    standby: bool, strategies: list[str]
) -> None:
    sup = LedgerSupervisor(standby)
    for n, strategy in enumerate(strategies, start=2):
        up = upgrade_to(sup, str(n), strategy)
        assert sup.rt.state.current is not None and sup.rt.state.current.version == str(n)
        assert up.staged is (standby and strategy == "drain-first")
        assert up.memory_back is True, (n, strategy)
        assert up.freed == {"cuda:0": CTX + MODEL}


def test_a_leak_still_fails_the_proof() -> None:
    """The proof can fail: memory the old worker leaves behind (a driver leak) shows."""
    sup = LedgerSupervisor(True)
    upgrade_to(sup, "2", "drain-first")
    real = sup.ledger.memory
    sup.ledger.memory = lambda idx: (real(idx)[0] + 64 * MiB, 140 << 30)  # type: ignore[method-assign]
    assert upgrade_to(sup, "3", "drain-first").memory_back is False


def test_a_held_retire_samples_fast_and_times_the_hold() -> None:
    """Drain-first with a standby: the new worker is released within a few fast samples
    of the old one's exit (not two slow settle periods), and the result names the hold."""
    sup = LedgerSupervisor(True)
    up = upgrade_to(sup, "2", "drain-first")
    assert up.memory_back is True
    assert sup.released_at - sup.exited_at <= 3 * HELD_EVERY_S
    assert "held_s" in up.phases and "staged_s" in up.phases and "retire_s" in up.phases
