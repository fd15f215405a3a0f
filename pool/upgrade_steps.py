"""The steps every zero-loss operation is made of (``pool.upgrade`` arranges them into
plans; ``pool.rescale`` and the recycle borrow them): start workers and wait for them,
retire workers and prove their memory back, check the contract, switch the routing table
and back, abandon, and finish with the typed ``UpgradeResult`` and its history entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

from pool.commands import ObserveUpgrade
from pool.contract import NOT_CHECKED_NEW, NOT_CHECKED_SERVING, differences
from pool.device_memory import (
    HELD_EVERY_S,
    MEMORY_TOLERANCE,
    MEMORY_WAIT_S,
    NVML_EVERY_S,
    SETTLE_EVERY_S,
    back_at,
    device_used,
    settled,
)
from pool.gpu import device_index
from pool.lifecycle import WorkerRecord, WorkerState
from pool.load_progress import LoadingReport
from pool.runtime import ModelRuntime
from pool.state import Deployed
from pool.stopping import KILL_GRACE_S
from pool.supervisor import Supervisor
from pool.tasks import Wait
from pool.upgrade_phases import PhaseTrack, UpgradePhase
from pool.upgrade_result import Restore, UpgradeResult
from pool.upgrade_waits import changed_state, gone_stopping_drained

log = logging.getLogger("pool.upgrade")  # one logger for an upgrade's story

Progress = Callable[..., None]

# Progress phases that also go to the log: an upgrade's story, step by step.
STORY = frozenset(
    {"strategy", "starting", "switched", "draining", "retired", "rolling_back", "cancelled"}
)

BootResult = Generator[Wait, bool, tuple[bool, str]]


class Refused(Exception):
    """An operation that cannot start (another one runs, bad target); exit code 1."""


class UpgradeSteps:
    """One upgrade/rollback/recycle of one model: its state and its steps (the plans that
    order them are ``pool.upgrade.Upgrade``)."""

    def __init__(
        self,
        sup: Supervisor,
        rt: ModelRuntime,
        target: Deployed,
        strategy: str,
        timeout_s: float,
        action: str,
        progress: Progress,
    ) -> None:
        self.sup = sup
        self.rt = rt
        self.target = target
        self.strategy = strategy
        self.action = action
        self.progress = progress
        self.t0 = self.sup.now
        self.deadline = self.t0 + timeout_s
        self.old_gen = rt.serving_gen
        self.from_version = rt.deployed.version if rt.deployed else ""
        self.started: list[WorkerRecord] = []
        self.stopped: list[WorkerRecord] = []
        self.phases: dict[str, float] = {}
        self.held_from = self.sup.now  # when a drain-first slot's clients began to wait
        self.freed: dict[str, int] = {}
        self.memory_back: bool | None = None
        self.worker_timings: dict[str, float] = {}
        self.cancelled: str | None = None  # pool-ctl cancel (or Ctrl-C): why
        self.restoring = False  # putting the old version back: not to be cancelled
        self.standbys_taken = 0
        self.staged = False  # drain-first staged the new weights while the old served
        # A new version whose contract breaks the serving one's is refused before the
        # switch unless the operator says the change is meant (--allow-contract-change).
        self.allow_contract_change = False
        self.contract_note = ""  # what the check found, for the result
        self.watch_note = ""  # what the watch window saw (pool.watch)
        self.restored: Restore | None = None  # set when a failure put the old version back
        self.track = PhaseTrack(sup.clock)  # the phase now, per pool.upgrade_phases
        self.pids_before = [r.pid for r in rt.alive()]
        self.result: UpgradeResult | None = None  # set by finish

    # ------------------------------------------------------------------ helpers
    def enter(self, phase: UpgradePhase) -> None:
        self.track.enter(phase)

    def say(self, phase: str, **info: Any) -> None:
        elapsed = round(self.sup.now - self.t0, 3)
        self.progress(phase, elapsed_s=elapsed, **info)
        if phase in STORY and self.action != "recycle":
            # The upgrade's story in the log, one line a step (pool-ctl sees the same).
            detail = " ".join(f"{k}={v}" for k, v in info.items() if v not in (None, [], {}))
            log.info(
                "%s of %s to %s: %s %s",
                self.action,
                self.rt.name,
                self.target.version,
                phase,
                detail,
                extra={
                    "model": self.rt.name,
                    "version": self.target.version,
                    "event": phase,
                    "elapsed_s": elapsed,
                },
            )

    def spawn(self, gen: int, slot: int, hold: bool = False) -> WorkerRecord:
        rec = self.sup.spawn(self.rt, gen, slot, hold)
        self.started.append(rec)
        if rec.from_standby:
            self.standbys_taken += 1
            self.say("standby_taken", worker=rec.wid, device=rec.device)
        return rec

    def cancel(self, why: str) -> None:
        """Give up at the next wait for a new worker (never while putting the old one
        back, and not after the switch: from there the new version is what serves)."""
        self.cancelled = why

    def _cancelling(self) -> bool:
        return self.cancelled is not None and not self.restoring

    def _changed_or_cancelled(
        self, recs: list[WorkerRecord], also: Callable[[], bool] = lambda: False
    ) -> Callable[[], bool]:
        changed = changed_state(recs)
        return lambda: changed() or self._cancelling() or also()

    def wait_boot(self, recs: list[WorkerRecord]) -> BootResult:
        """Wait until every worker is ready (True) or one fails (False, reason)."""
        t = self.sup.now
        reported: dict[str, str] = {}
        loading = LoadingReport([r for r in recs if not r.staged])  # staging said its bytes
        while True:
            for r in recs:
                if reported.get(r.wid) != r.state.value and r.state.value in (
                    "loading",
                    "warming",
                    "validating",
                ):
                    reported[r.wid] = r.state.value
                    self.say(r.state.value, worker=r.wid, pid=r.pid, device=r.device)
            loading.say(self.say)
            if all(r.state is WorkerState.READY for r in recs):
                self.phases["boot_s"] = self.sup.now - t
                self.worker_timings = dict(recs[0].timings)
                return True, ""
            bad = [
                r
                for r in recs
                if r.state in (WorkerState.FAILED, WorkerState.EXITED, WorkerState.STOPPING)
            ]
            if bad:
                return False, f"{bad[0].wid}: {bad[0].failure or bad[0].state.value}"
            if self._cancelling():
                return False, str(self.cancelled)
            left = self.deadline - self.sup.now
            if left <= 0:
                return False, "not ready before the upgrade timeout"
            met = yield Wait(self._changed_or_cancelled(recs, loading.moved), left, "boot")
            if not met and self.sup.now >= self.deadline:
                return False, "not ready before the upgrade timeout"

    def retire(
        self, recs: list[WorkerRecord], held: dict[str, int | None] | None = None
    ) -> Generator[Wait, bool, None]:
        """Drain, stop and reap ``recs``; then wait for their GPU memory to come back.
        ``held``: clients wait on this retire (drain-first); the reference levels, so the
        wait samples every HELD_EVERY_S and ends once each device is back at its level."""
        if not recs:
            return
        t = self.sup.now
        before = {r.device: device_used(self.sup, r.device) for r in recs}
        for r in recs:
            self.sup.retire(r)
        self.say("draining", workers=[r.wid for r in recs], pids=[r.pid for r in recs])
        pool = self.sup.pool
        limit = pool.drain_timeout_s + pool.stop_timeout_s + 3 * KILL_GRACE_S + 5
        yield Wait(gone_stopping_drained(self.sup, recs), limit, "exit")
        self.stopped.extend(recs)
        self.phases["drain_s"] = self.phases.get("drain_s", 0.0) + self.sup.now - t
        t = self.sup.now
        gpu_recs = [r for r in recs if device_index(r.device) is not None]
        if gpu_recs:
            pids = {r.pid for r in gpu_recs}

            def gone() -> bool:
                for r in gpu_recs:
                    procs = self.sup.ports.memory.process_bytes(device_index(r.device) or 0)
                    if procs is not None and pids & procs.keys():
                        return False
                return True

            every = HELD_EVERY_S if held is not None else NVML_EVERY_S
            yield Wait(gone, MEMORY_WAIT_S, "nvml", every_s=every)
            # The process entry can vanish a moment before the driver's count of used
            # memory settles: wait for two equal readings in a row, a period apart (or,
            # held, for the level known to be the target).
            devices = [r.device for r in gpu_recs]
            level = self.sup.device_level
            if held is not None and all(held.get(d) is not None for d in devices):
                back = back_at(level, held, self.sup.clock)
                yield Wait(back, 3.0, "settle", every_s=HELD_EVERY_S)
            else:
                yield Wait(settled(level, devices), 3.0, "settle", every_s=SETTLE_EVERY_S)
            for dev, used in before.items():
                after = device_used(self.sup, dev)
                if used is not None and after is not None:
                    self.freed[dev] = self.freed.get(dev, 0) + max(0, used - after)
        self.phases["retire_s"] = self.phases.get("retire_s", 0.0) + self.sup.now - t
        self.say("retired", pids=[r.pid for r in recs], bytes_freed=dict(self.freed))

    def check_memory(self, reference: dict[str, int | None]) -> None:
        """Retired means each device's used memory is back within 16 MiB of ``reference``."""
        ok = True
        for dev, level in reference.items():
            now = device_used(self.sup, dev)
            if level is None or now is None:
                continue
            if abs(now - level) > MEMORY_TOLERANCE:
                ok = False
                log.warning(
                    "%s: %s used %d MiB, reference %d MiB",
                    self.rt.name,
                    dev,
                    now >> 20,
                    level >> 20,
                )
        if reference and any(v is not None for v in reference.values()):
            self.memory_back = ok

    def contract_refusal(self, gen: int) -> str | None:
        """Why generation ``gen`` may not replace the serving one (``pool.contract``);
        None when its contract keeps the serving one's, or either is not known."""
        old = self.rt.contracts.get(self.old_gen)
        new = self.rt.contracts.get(gen)
        if old is None or new is None:
            self.contract_note = NOT_CHECKED_SERVING if old is None else NOT_CHECKED_NEW
            return None
        diffs = differences(old, new)
        if not diffs:
            self.contract_note = "kept"
            return None
        if self.allow_contract_change:
            self.contract_note = "changed (allowed): " + "; ".join(diffs)
            self.say("contract_changed", differences=diffs)
            return None
        return (
            "contract: the new version breaks the serving one's: "
            + "; ".join(diffs)
            + " (pool-ctl upgrade --allow-contract-change to switch anyway)"
        )

    def switch(self, gen: int) -> str | None:
        """Record the new version as current, then route to it; if the record cannot be
        written, say why and do not switch (a restart would bring back the old one)."""
        try:
            self.sup.ports.store.commit_current(self.rt.state, self.rt.gens[gen])
        except OSError as exc:
            return f"state: cannot record the switch ({exc.strerror or exc}); not switching"
        self.rt.serving_gen = gen
        self.sup.activate(self.rt)
        self.phases["switch_at_s"] = self.sup.now - self.t0
        self.say("switched", generation=gen, version=self.rt.gens[gen].version)
        return None

    def unswitch(self) -> None:
        """Route back to the old generation; the state file is rewritten by ``finish``."""
        self.rt.serving_gen = self.old_gen
        self.rt.state.current = self.rt.gens[self.old_gen]
        self.sup.activate(self.rt)

    # ------------------------------------------------------------------ strategies

    def abandon(self, recs: list[WorkerRecord]) -> Generator[Wait, bool, None]:
        self.enter(UpgradePhase.ABANDONING)
        for r in recs:
            if r.alive:
                self.sup.kill(r, "abandoned by a failed upgrade", "abandoned")
        yield Wait(lambda: not any(r.alive for r in recs), 3 * KILL_GRACE_S + 2, "abandon")


    def finish(self, ok: bool, reason: str) -> UpgradeResult:
        rt = self.rt
        elapsed = self.sup.now - self.t0
        if ok:
            end = UpgradePhase.COMMITTED
        elif self.restored is None or self.restored.ok:
            end = UpgradePhase.ROLLED_BACK
        else:
            end = UpgradePhase.RESTORE_FAILED  # the old version is not back everywhere either
        self.enter(end)
        outcome = end.value
        stopped = {r.pid for r in self.stopped}
        alive = {r.pid for r in rt.alive()}
        self.result = res = UpgradeResult(
            ok=ok,
            model=rt.name,
            action=self.action,
            outcome=end,
            strategy=self.strategy,
            from_version=self.from_version,
            target_version=self.target.version,
            digest=self.target.digest,
            generation=rt.serving_gen,
            pids_started=tuple(r.pid for r in self.started),
            pids_stopped=tuple(r.pid for r in self.stopped),
            pids_kept=tuple(p for p in self.pids_before if p in alive and p not in stopped),
            path=tuple(self.track.path),
            phase_s=dict(self.track.seconds),
            steps_s=dict(self.phases),
            worker_timings=dict(self.worker_timings),
            bytes_freed=dict(self.freed),
            memory_back=self.memory_back,
            standbys_taken=self.standbys_taken,
            staged=self.staged,
            elapsed_s=elapsed,
            contract=self.contract_note,
            watch=self.watch_note,
            restore=self.restored,
            reason="" if ok else reason,
        )
        result = res.to_json()  # the history entry's fields, as pool-ctl gets them
        if not ok:
            log.error(
                "%s of %s to %s %s: %s%s",
                self.action,
                rt.name,
                self.target.version,
                outcome.replace("_", " "),
                reason,
                f"; putting {self.from_version} back failed too: {self.restored.reason}"
                if self.restored is not None and not self.restored.ok
                else "",
                extra={"model": rt.name},
            )
        else:
            log.info(
                "%s of %s %s -> %s committed in %.2fs (%s)",
                self.action,
                rt.name,
                self.from_version,
                self.target.version,
                elapsed,
                self.strategy,
                extra={"model": rt.name, "version": self.target.version},
            )
        if not ok and self.old_gen in rt.gens:
            rt.state.current = rt.gens[self.old_gen]  # a switch may have recorded the target
        if self.action != "recycle":
            self.sup.ports.store.record(
                rt.state,
                self.target,
                self.action,
                outcome,
                reason=reason or None,
                strategy=self.strategy,
                from_version=self.from_version,
                phases=result["phases"],
                bytes_freed=self.freed,
                pids_started=result["pids_started"],
                pids_stopped=result["pids_stopped"],
                standby=result["standby"],
                elapsed_s=result["elapsed_s"],
                contract=self.contract_note,
                watch=self.watch_note,
                restore=result["restore"],
                **self.rt.contract_record(self.target),
            )
        freed = sum(self.freed.values())
        self.sup.emit(ObserveUpgrade(rt.name, self.action, outcome, dict(self.phases), freed))
        return res

