"""Hot update, rollback and recycle: the zero-loss paths, as loop-driven operations.

surge        start generation N+1 beside N; switch the routing table in one step once
             every new worker is ready; drain N; wait until its processes are reaped and
             (on GPUs) their memory is back.
drain-first  one slot (device entry) at a time: stop routing to N's worker there (its
             requests wait in the router's bounded, deadline-aware queue or go to the other
             slots), let it finish and exit, start N+1 there. The routing table switches
             to N+1 when the first new worker is ready, so no client sees an older version
             after a newer one. A failure puts the old version back.
auto         surge when NVML shows room for another copy plus a margin, else drain-first.

With a hot standby on the device (``pool.standby``) every new worker starts in it; in
drain-first it first stages the new weights on the host while the old worker still
serves, and puts them on the device once the old one's memory is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from typing import Any

from pool.contract import NOT_CHECKED_NEW, NOT_CHECKED_SERVING, differences
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
from pool.watch import watch

log = logging.getLogger(__name__)

MEMORY_TOLERANCE = 16 << 20  # retired means device memory back within this of its level
MEMORY_WAIT_S = 10.0
# NVML sampling periods while memory comes back: the process list, then the used count.
# "Settled" is two equal readings SETTLE_EVERY_S apart, not two loop turns apart.
NVML_EVERY_S = 0.1
SETTLE_EVERY_S = 0.25
# While a drain-first retire holds the device's clients, the wait is the whole critical
# path: sample fast there, and settle on "back within MEMORY_TOLERANCE of the known
# reference" instead of two equal slow readings. Bounded by MEMORY_WAIT_S all the same.
# Every 2 ms: the loop sleeps only until the next sample is due (Scheduler.wake_in_ms).
HELD_EVERY_S = 0.002
Progress = Callable[..., None]

# Progress phases that also go to the log: an upgrade's story, step by step.
STORY = frozenset(
    {"strategy", "starting", "switched", "draining", "retired", "rolling_back", "cancelled"}
)

BootResult = Generator[Wait, bool, tuple[bool, str]]


def _changed(recs: list[WorkerRecord]) -> Callable[[], bool]:
    """A condition: some worker of ``recs`` changed state since now."""
    before = [r.state for r in recs]
    return lambda: [r.state for r in recs] != before


def _settled(sup: Supervisor, devices: list[str]) -> Callable[[], bool]:
    last: dict[str, int | None] = {}

    def check() -> bool:
        now = {d: _device_used(sup, d) for d in devices}
        same = now == last
        last.clear()
        last.update(now)
        return same

    return check


def _gone_stopping_drained(sup: Supervisor, recs: list[WorkerRecord]) -> Callable[[], bool]:
    """A condition: every worker of ``recs`` has exited. One that has drained (holds no
    request any more) is stopped as soon as a check sees it, not at the next tick (up to
    50 ms later, which a drain-first upgrade's clients would wait out)."""

    def check() -> bool:
        for r in recs:
            if r.state is WorkerState.DRAINING and not r.slot_view.load:
                sup.stop(r)
        return not any(r.alive for r in recs)

    return check


def _back_at(sup: Supervisor, reference: dict[str, int | None]) -> Callable[[], bool]:
    """A condition: every device's level is within MEMORY_TOLERANCE of ``reference``, or
    has not moved for SETTLE_EVERY_S (another process changed the level: the proof then
    fails, but the held clients do not wait the whole settle timeout for it)."""
    since: dict[str, tuple[int | None, float]] = {}

    def check() -> bool:
        t = time.monotonic()
        back = True
        for dev, level in reference.items():
            now = _device_used(sup, dev)
            if level is None or now is None or abs(now - level) <= MEMORY_TOLERANCE:
                continue
            seen, at = since.get(dev, (None, t))
            if seen != now:
                since[dev] = (now, t)
                back = False
            elif t - at < SETTLE_EVERY_S:
                back = False
        return back

    return check


class Refused(Exception):
    """An operation that cannot start (another one runs, bad target); exit code 1."""


def choose_strategy(sup: Supervisor, rt: ModelRuntime) -> tuple[str, str]:
    """(strategy, why) for ``auto``."""
    gpus = [(d, device_index(d)) for d in rt.devices]
    if all(idx is None for _, idx in gpus):
        return "surge", "CPU devices always surge"
    need: dict[int, int] = {}
    for rec in rt.alive(rt.serving_gen):
        idx = device_index(rec.device)
        if idx is not None:
            procs = sup.gpu.process_bytes(idx) or {}  # read now: a cached sample can lag
            foot = procs.get(rec.pid or -1) or max(rec.gpu_bytes or 0, rec.ready_gpu_bytes or 0)
            wants = sup.takes_standby(rt, rec.device)
            standby = sup.standbys.waiting(rec.device) if wants else None
            if standby is not None and standby.pid is not None:
                # The new worker starts in the standby, whose context is there already:
                # it needs room for the model only.
                foot = max(0, foot - procs.get(standby.pid, 0))
            need[idx] = need.get(idx, 0) + foot
    margin = sup.pool.surge_margin_mb << 20
    for idx, foot in need.items():
        mem = sup.gpu.memory(idx)
        if mem is None:
            return "drain-first", f"NVML cannot read cuda:{idx}"
        if mem[1] < foot + margin:
            return "drain-first", (
                f"cuda:{idx} has {mem[1] >> 20} MiB free, needs "
                f"{(foot + margin) >> 20} MiB for a second copy"
            )
    return "surge", "room for both versions on every device"


def _device_used(sup: Supervisor, device: str) -> int | None:
    """Used memory without bare contexts (standbys): ``Supervisor.device_level``."""
    return sup.device_level(device)


class Upgrade:
    """One upgrade/rollback/recycle of one model; ``run`` is the loop-driven operation."""

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
        self.t0 = time.monotonic()
        self.deadline = self.t0 + timeout_s
        self.old_gen = rt.serving_gen
        self.from_version = rt.deployed.version if rt.deployed else ""
        self.started: list[WorkerRecord] = []
        self.stopped: list[WorkerRecord] = []
        self.phases: dict[str, float] = {}
        self.held_from = time.monotonic()  # when a drain-first slot's clients began to wait
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
        self.track = PhaseTrack(time.monotonic)  # the phase now, per pool.upgrade_phases
        self.pids_before = [r.pid for r in rt.alive()]
        self.result: UpgradeResult | None = None  # set by finish

    # ------------------------------------------------------------------ helpers
    def enter(self, phase: UpgradePhase) -> None:
        self.track.enter(phase)

    def say(self, phase: str, **info: Any) -> None:
        elapsed = round(time.monotonic() - self.t0, 3)
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
        changed = _changed(recs)
        return lambda: changed() or self._cancelling() or also()

    def wait_boot(self, recs: list[WorkerRecord]) -> BootResult:
        """Wait until every worker is ready (True) or one fails (False, reason)."""
        t = time.monotonic()
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
                self.phases["boot_s"] = time.monotonic() - t
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
            left = self.deadline - time.monotonic()
            if left <= 0:
                return False, "not ready before the upgrade timeout"
            met = yield Wait(self._changed_or_cancelled(recs, loading.moved), left, "boot")
            if not met and time.monotonic() >= self.deadline:
                return False, "not ready before the upgrade timeout"

    def retire(
        self, recs: list[WorkerRecord], held: dict[str, int | None] | None = None
    ) -> Generator[Wait, bool, None]:
        """Drain, stop and reap ``recs``; then wait for their GPU memory to come back.
        ``held``: clients wait on this retire (drain-first); the reference levels, so the
        wait samples every HELD_EVERY_S and ends once each device is back at its level."""
        if not recs:
            return
        t = time.monotonic()
        before = {r.device: _device_used(self.sup, r.device) for r in recs}
        for r in recs:
            self.sup.retire(r)
        self.say("draining", workers=[r.wid for r in recs], pids=[r.pid for r in recs])
        pool = self.sup.pool
        limit = pool.drain_timeout_s + pool.stop_timeout_s + 3 * KILL_GRACE_S + 5
        yield Wait(_gone_stopping_drained(self.sup, recs), limit, "exit")
        self.stopped.extend(recs)
        self.phases["drain_s"] = self.phases.get("drain_s", 0.0) + time.monotonic() - t
        t = time.monotonic()
        gpu_recs = [r for r in recs if device_index(r.device) is not None]
        if gpu_recs:
            pids = {r.pid for r in gpu_recs}

            def gone() -> bool:
                for r in gpu_recs:
                    procs = self.sup.gpu.process_bytes(device_index(r.device) or 0)
                    if procs is not None and pids & procs.keys():
                        return False
                return True

            every = HELD_EVERY_S if held is not None else NVML_EVERY_S
            yield Wait(gone, MEMORY_WAIT_S, "nvml", every_s=every)
            # The process entry can vanish a moment before the driver's count of used
            # memory settles: wait for two equal readings in a row, a period apart (or,
            # held, for the level known to be the target).
            devices = [r.device for r in gpu_recs]
            if held is not None and all(held.get(d) is not None for d in devices):
                yield Wait(_back_at(self.sup, held), 3.0, "settle", every_s=HELD_EVERY_S)
            else:
                yield Wait(_settled(self.sup, devices), 3.0, "settle", every_s=SETTLE_EVERY_S)
            for dev, used in before.items():
                after = _device_used(self.sup, dev)
                if used is not None and after is not None:
                    self.freed[dev] = self.freed.get(dev, 0) + max(0, used - after)
        self.phases["retire_s"] = self.phases.get("retire_s", 0.0) + time.monotonic() - t
        self.say("retired", pids=[r.pid for r in recs], bytes_freed=dict(self.freed))

    def check_memory(self, reference: dict[str, int | None]) -> None:
        """Retired means each device's used memory is back within 16 MiB of ``reference``."""
        ok = True
        for dev, level in reference.items():
            now = _device_used(self.sup, dev)
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
            self.sup.store.commit_current(self.rt.state, self.rt.gens[gen])
        except OSError as exc:
            return f"state: cannot record the switch ({exc.strerror or exc}); not switching"
        self.rt.serving_gen = gen
        self.sup.activate(self.rt)
        self.phases["switch_at_s"] = time.monotonic() - self.t0
        self.say("switched", generation=gen, version=self.rt.gens[gen].version)
        return None

    def unswitch(self) -> None:
        """Route back to the old generation; the state file is rewritten by ``finish``."""
        self.rt.serving_gen = self.old_gen
        self.rt.state.current = self.rt.gens[self.old_gen]
        self.sup.activate(self.rt)

    # ------------------------------------------------------------------ strategies
    def run(self) -> Generator[Wait, bool, UpgradeResult]:
        rt = self.rt
        if self.strategy == "auto":
            self.strategy, why = choose_strategy(self.sup, rt)
            self.say("strategy", strategy=self.strategy, why=why)
        if self.strategy == "surge":
            ok, reason = yield from self.surge()
        else:
            ok, reason = yield from self.drain_first()
        return self.finish(ok, reason)

    def surge(self) -> BootResult:
        rt = self.rt
        old = rt.alive(self.old_gen)
        reference = {r.device: _device_used(self.sup, r.device) for r in old}
        gen = self.sup.new_generation(rt, self.target)
        self.enter(UpgradePhase.STARTING)
        self.say("starting", generation=gen, version=self.target.version)
        new = [self.spawn(gen, slot) for slot in range(len(rt.devices))]
        ok, reason = yield from self.wait_boot(new)
        refusal = self.contract_refusal(gen) if ok else None
        refusal = refusal or (self.switch(gen) if ok else None)
        if not ok or refusal:
            yield from self.abandon(new)
            return False, refusal or reason
        failed = yield from self.watch_window(new, old)
        if failed:
            self.unswitch()  # the old workers never stopped: one assignment
            self.say("switched_back", generation=self.old_gen, version=self.from_version)
            self.enter(UpgradePhase.RETIRING)
            yield from self.retire(new)
            return False, failed
        self.enter(UpgradePhase.RETIRING)
        yield from self.retire(old)
        self.check_memory(reference)
        for r in new:
            # Each new worker started while the old ones served: its level at spawn counted
            # them. Take off what their retire gave back, so that a later drain-first retire
            # of this worker is compared with the device as it is without either version.
            if r.device_used_at_spawn is not None and r.device in self.freed:
                r.device_used_at_spawn -= self.freed[r.device]
        return True, ""

    def watch_window(
        self, new: list[WorkerRecord], old: list[WorkerRecord]
    ) -> Generator[Wait, bool, str]:
        """The canary after a switch (``pool.watch``): "" when the new version passed,
        else why it is rolled back."""
        pool = self.sup.pool
        if pool.watch_requests <= 0 or pool.watch_s <= 0:
            return ""
        seconds = min(pool.watch_s, max(0.0, self.deadline - time.monotonic()))
        self.enter(UpgradePhase.WATCHING)
        result = yield from watch(new, old, pool.watch_requests, seconds, self.say)
        self.phases["watch_s"] = result.seconds
        self.watch_note = result.note()
        return result.failed

    def drain_first(self) -> BootResult:
        rt = self.rt
        gen = self.sup.new_generation(rt, self.target)
        done: list[int] = []
        for slot in range(len(rt.devices)):
            old = [r for r in rt.alive(self.old_gen) if r.slot == slot]
            reference = {r.device: r.device_used_at_spawn for r in old}
            device = rt.devices[slot]
            if self.sup.takes_standby(rt, device) and self.sup.standbys.available(device):
                new = yield from self.staged_start(gen, slot, old, reference)
                held_from = self.held_from
            else:
                self.enter(UpgradePhase.DRAINING)
                held_from = time.monotonic()
                yield from self.retire(old, held=reference)
                self.check_memory(reference)
                self.enter(UpgradePhase.STARTING)
                self.say("starting", generation=gen, slot=slot, device=device)
                new = self.spawn(gen, slot)
            self.enter(UpgradePhase.STARTING)
            ok, reason = yield from self.wait_boot([new])
            if ok:
                # Drain start -> the new worker ready: how long this slot's clients waited.
                held_s = time.monotonic() - held_from
                self.phases["held_s"] = max(self.phases.get("held_s", 0.0), held_s)
            refusal = self.contract_refusal(gen) if ok and not done else None
            first = ok and not refusal and rt.serving_gen != gen
            if first:
                refusal = self.switch(gen)  # None once switched
            if not ok or refusal:
                yield from self.abandon([new])
                self.restored = yield from self.restore(slot, done)
                return False, refusal or reason
            done.append(slot)
            if first:
                others = [r for r in rt.alive(self.old_gen) if r.slot != slot]
                failed = yield from self.watch_window([new], old + others)
                if failed:
                    self.unswitch()  # the other devices still run it
                    self.say("switched_back", generation=self.old_gen, version=self.from_version)
                    yield from self.abandon([new])
                    self.restored = yield from self.restore(slot, [])
                    return False, failed
            else:
                self.sup.activate(rt)
        return True, ""

    def staged_start(
        self, gen: int, slot: int, old: list[WorkerRecord], reference: dict[str, int | None]
    ) -> Generator[Wait, bool, WorkerRecord]:
        """Drain-first through the standby: stage the new weights on the host while the
        old worker serves, retire it, prove its memory back, then let the new one load."""
        device = self.rt.devices[slot]
        self.enter(UpgradePhase.STAGING)
        self.say("starting", generation=gen, slot=slot, device=device, staged=True)
        new = self.spawn(gen, slot, hold=True)
        t = time.monotonic()
        loading = LoadingReport([new])  # the bytes it stages, as a bar in pool-ctl
        while not (new.staged or not new.booting) and time.monotonic() < self.deadline:
            left = max(0.0, self.deadline - time.monotonic())
            yield Wait(lambda: new.staged or not new.booting or loading.moved(), left, "stage")
            loading.say(self.say)
        if not new.staged:
            return new  # failed, or timed out: wait_boot says which; the old still serves
        self.phases["staged_s"] = time.monotonic() - t
        self.staged = True
        self.say("staged", worker=new.wid, staged_s=round(self.phases["staged_s"], 3))
        self.enter(UpgradePhase.DRAINING)
        self.held_from = time.monotonic()
        yield from self.retire(old, held=reference)
        self.check_memory(reference)
        if new.alive:
            # The level this worker's own drain-first retire must come back to: the device
            # with the old one gone and this one still a bare context. Its level at spawn
            # counted the old worker, which served then.
            new.device_used_at_spawn = self.sup.device_level(device)
            self.sup.release(new)
        return new

    def abandon(self, recs: list[WorkerRecord]) -> Generator[Wait, bool, None]:
        self.enter(UpgradePhase.ABANDONING)
        for r in recs:
            if r.alive:
                self.sup.kill(r, "abandoned by a failed upgrade", "abandoned")
        yield Wait(lambda: not any(r.alive for r in recs), 3 * KILL_GRACE_S + 2, "abandon")

    def restore(self, failed_slot: int, switched: list[int]) -> Generator[Wait, bool, Restore]:
        """Put the old version back on the failed slot, then on the slots already switched;
        say whether every one of them booted."""
        self.restoring = True
        rt = self.rt
        self.enter(UpgradePhase.ROLLING_BACK)
        self.say("rolling_back", slot=failed_slot)
        failures: list[str] = []
        # A staged start fails before the old worker is retired: it still serves there.
        if not any(r.slot == failed_slot for r in rt.alive(self.old_gen)):
            back = self.spawn(self.old_gen, failed_slot)
            ok, why = yield from self.wait_boot([back])
            if not ok:
                failures.append(why)
        if rt.serving_gen != self.old_gen:
            self.unswitch()
        for slot in switched:
            gone = [r for r in rt.alive() if r.slot == slot and r.generation != self.old_gen]
            yield from self.retire(gone)
            rec = self.spawn(self.old_gen, slot)
            ok, why = yield from self.wait_boot([rec])
            if not ok:
                failures.append(why)
            self.sup.activate(rt)
        if failures:
            self.say("restore_failed", reason=failures[0])
        return Restore(not failures, "; ".join(failures))

    # ------------------------------------------------------------------ the end
    def contract_record(self) -> dict[str, Any]:
        """The target's inputs and outputs for its history entry, when known."""
        gens = [g for g, d in self.rt.gens.items() if d == self.target]
        contract = self.rt.contracts.get(max(gens)) if gens else None
        if contract is None:
            return {}
        return {
            "inputs": [t.to_json() for t in contract.inputs],
            "outputs": [t.to_json() for t in contract.outputs],
            "batchable": contract.batchable,
        }

    def finish(self, ok: bool, reason: str) -> UpgradeResult:
        rt = self.rt
        elapsed = time.monotonic() - self.t0
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
            self.sup.store.record(
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
                **self.contract_record(),
            )
        self.sup.metrics.observe_upgrade(
            rt.name, self.action, outcome, self.phases, sum(self.freed.values())
        )
        return res
