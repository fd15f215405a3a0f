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

from collections.abc import Generator

from pool.device_memory import HELD_EVERY_S, SETTLE_EVERY_S, choose_strategy, device_used
from pool.lifecycle import WorkerRecord
from pool.load_progress import LoadingReport
from pool.tasks import Wait
from pool.upgrade_phases import UpgradePhase
from pool.upgrade_result import Restore, UpgradeResult
from pool.upgrade_steps import BootResult, Progress, Refused, UpgradeSteps
from pool.watch import watch

# Names callers import from here: the operation, its refusal, its progress callback.
__all__ = ["HELD_EVERY_S", "SETTLE_EVERY_S", "Progress", "Refused", "Upgrade", "choose_strategy"]


class Upgrade(UpgradeSteps):
    """One upgrade/rollback/recycle of one model; ``run`` is the loop-driven operation."""

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
        reference = {r.device: device_used(self.sup, r.device) for r in old}
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
        seconds = min(pool.watch_s, max(0.0, self.deadline - self.sup.now))
        self.enter(UpgradePhase.WATCHING)
        result = yield from watch(new, old, pool.watch_requests, seconds, self.say, self.sup.clock)
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
                held_from = self.sup.now
                yield from self.retire(old, held=reference)
                self.check_memory(reference)
                self.enter(UpgradePhase.STARTING)
                self.say("starting", generation=gen, slot=slot, device=device)
                new = self.spawn(gen, slot)
            self.enter(UpgradePhase.STARTING)
            ok, reason = yield from self.wait_boot([new])
            if ok:
                # Drain start -> the new worker ready: how long this slot's clients waited.
                held_s = self.sup.now - held_from
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
        t = self.sup.now
        loading = LoadingReport([new])  # the bytes it stages, as a bar in pool-ctl
        while not (new.staged or not new.booting) and self.sup.now < self.deadline:
            left = max(0.0, self.deadline - self.sup.now)
            yield Wait(lambda: new.staged or not new.booting or loading.moved(), left, "stage")
            loading.say(self.say)
        if not new.staged:
            return new  # failed, or timed out: wait_boot says which; the old still serves
        self.phases["staged_s"] = self.sup.now - t
        self.staged = True
        self.say("staged", worker=new.wid, staged_s=round(self.phases["staged_s"], 3))
        self.enter(UpgradePhase.DRAINING)
        self.held_from = self.sup.now
        yield from self.retire(old, held=reference)
        self.check_memory(reference)
        if new.alive:
            # The level this worker's own drain-first retire must come back to: the device
            # with the old one gone and this one still a bare context. Its level at spawn
            # counted the old worker, which served then.
            new.device_used_at_spawn = self.sup.device_level(device)
            self.sup.release(new)
        return new


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
