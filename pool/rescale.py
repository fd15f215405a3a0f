"""Rescale a model in place: start only the added workers, retire only the removed ones.

``pool-ctl scale`` (and a reload that changes only a model's device list) keeps every
serving worker whose device stays. The plan matches the new device list against the
serving generation's workers (same device, the same position first), so::

    [cpu]              -> [cpu, cpu]            keeps pid A, starts one
    [cuda:0, cuda:1]   -> [cuda:1]              keeps the cuda:1 worker, retires cuda:0

Added workers are of the serving generation, i.e. the *live* version (never the
config's), and join routing only once ready (loaded and warmed up). Removed workers
drain (the router stops sending them requests, they finish what they hold) and exit.
Phases, in order::

    PLANNING -> STARTING -> RETIRING -> DONE
    (an added worker fails: STARTING -> ABANDONING -> FAILED; the kept workers and the
     old device list stay, nothing retired)
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pool.lifecycle import IllegalTransition, WorkerRecord, WorkerState
from pool.runtime import ModelRuntime
from pool.supervisor import Supervisor
from pool.tasks import Wait
from pool.upgrade import Progress, Upgrade
from pool.upgrade_phases import UpgradePhase

log = logging.getLogger(__name__)


class RescalePhase(StrEnum):
    PLANNING = "planning"
    STARTING = "starting"  # the added workers boot; the kept ones serve meanwhile
    RETIRING = "retiring"  # the removed workers drain and exit
    ABANDONING = "abandoning"  # an added worker failed: the others are killed
    DONE = "done"  # terminal: the new device list serves
    FAILED = "failed"  # terminal: the old device list serves as before

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


R = RescalePhase
TRANSITIONS: dict[RescalePhase, frozenset[RescalePhase]] = {
    R.PLANNING: frozenset({R.STARTING, R.RETIRING, R.DONE, R.FAILED}),
    R.STARTING: frozenset({R.RETIRING, R.ABANDONING, R.DONE}),
    R.RETIRING: frozenset({R.DONE}),
    R.ABANDONING: frozenset({R.FAILED}),
    R.DONE: frozenset(),
    R.FAILED: frozenset(),
}


@dataclass(frozen=True)
class Plan:
    """Which serving worker takes which new slot; the rest of the work follows."""

    devices: tuple[str, ...]
    keep: tuple[tuple[int, WorkerRecord], ...]  # (new slot, worker kept there)
    add: tuple[int, ...]  # new slots with no worker: started
    remove: tuple[WorkerRecord, ...]  # serving workers with no slot: retired


def plan(rt: ModelRuntime, devices: tuple[str, ...]) -> Plan:
    """Match ``devices`` with the serving generation's live workers, keeping the most."""
    gone = (WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.FAILED)
    serving = [w for w in rt.alive(rt.serving_gen) if w.state not in gone]
    free = sorted(serving, key=lambda w: w.slot)
    keep: list[tuple[int, WorkerRecord]] = []
    open_slots: list[int] = []
    # The same device at the same position first, so an unchanged prefix keeps its slots.
    for slot, dev in enumerate(devices):
        same = next((w for w in free if w.device == dev and w.slot == slot), None)
        if same is not None:
            free.remove(same)
            keep.append((slot, same))
        else:
            open_slots.append(slot)
    add: list[int] = []
    for slot in open_slots:
        other = next((w for w in free if w.device == devices[slot]), None)
        if other is not None:
            free.remove(other)
            keep.append((slot, other))
        else:
            add.append(slot)
    return Plan(devices, tuple(sorted(keep, key=lambda p: p[0])), tuple(add), tuple(free))


@dataclass(frozen=True)
class RescaleResult:
    ok: bool
    model: str
    outcome: RescalePhase  # DONE or FAILED
    version: str
    devices: tuple[str, ...]  # what serves afterwards
    pids_kept: tuple[int | None, ...]
    pids_started: tuple[int | None, ...]
    pids_stopped: tuple[int | None, ...]
    path: tuple[RescalePhase, ...]
    elapsed_s: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "model": self.model,
            "action": "scale",
            "outcome": "rescaled" if self.ok else "failed",
            "version": self.version,
            "devices": list(self.devices),
            "pids_kept": list(self.pids_kept),
            "pids_started": list(self.pids_started),
            "pids_stopped": list(self.pids_stopped),
            "phases": [p.value for p in self.path],
            "elapsed_s": round(self.elapsed_s, 3),
            "reason": self.reason,
        }


class Rescale:
    """One rescale of one model; ``run`` is the loop-driven operation."""

    def __init__(
        self,
        sup: Supervisor,
        rt: ModelRuntime,
        devices: tuple[str, ...],
        timeout_s: float,
        progress: Progress,
    ) -> None:
        self.sup = sup
        self.rt = rt
        self.devices = devices
        self.t0 = self.sup.now
        self.phase = R.PLANNING
        self.path = [R.PLANNING]
        # The boot and retire waits are the upgrade's own (same progress, same limits).
        dep = rt.deployed
        assert dep is not None
        self.steps = Upgrade(sup, rt, dep, "surge", timeout_s, "scale", progress)

    def enter(self, new: RescalePhase) -> None:
        if new not in TRANSITIONS[self.phase]:
            raise IllegalTransition(f"rescale: {self.phase.value} -> {new.value}")
        self.phase = new
        self.path.append(new)

    def run(self) -> Generator[Wait, bool, RescaleResult]:
        rt, sup, say = self.rt, self.sup, self.steps.say
        p = plan(rt, self.devices)
        before_devices = rt.devices
        before_slots = [(w, w.slot) for _, w in p.keep]
        say(
            "plan",
            devices=list(self.devices),
            keep=[w.pid for _, w in p.keep],
            start=len(p.add),
            stop=[w.pid for w in p.remove],
        )
        rt.restarts.clear()  # slot numbers change; refill() after the operation redoes it
        rt.devices = self.devices
        for slot, w in p.keep:
            w.slot = slot
        started: list[WorkerRecord] = []
        if p.add:
            self.enter(R.STARTING)
            self.steps.enter(UpgradePhase.STARTING)  # the borrowed steps check their own
            say("starting", slots=list(p.add), devices=[self.devices[s] for s in p.add])
            # Of the serving generation: each joins routing once ready (warmed up).
            started = [self.steps.spawn(rt.serving_gen, slot) for slot in p.add]
            ok, reason = yield from self.steps.wait_boot(started)
            if not ok:
                self.enter(R.ABANDONING)
                yield from self.steps.abandon(started)
                rt.devices = before_devices
                for w, slot in before_slots:
                    w.slot = slot
                sup.activate(rt)
                return self.finish(p, started, [], reason)
            sup.activate(rt)
        if p.remove:
            self.enter(R.RETIRING)
            yield from self.steps.retire(list(p.remove))
        return self.finish(p, started, list(p.remove), "")

    def finish(
        self, p: Plan, started: list[WorkerRecord], stopped: list[WorkerRecord], reason: str
    ) -> RescaleResult:
        ok = not reason
        self.enter(R.DONE if ok else R.FAILED)
        rt = self.rt
        dep = rt.deployed
        res = RescaleResult(
            ok=ok,
            model=rt.name,
            outcome=self.phase,
            version=dep.version if dep else "",
            devices=tuple(rt.devices),
            pids_kept=tuple(w.pid for _, w in p.keep),
            pids_started=tuple(w.pid for w in started) if ok else (),
            pids_stopped=tuple(w.pid for w in stopped),
            path=tuple(self.path),
            elapsed_s=self.sup.now - self.t0,
            reason=reason,
        )
        level = logging.INFO if ok else logging.ERROR
        log.log(
            level,
            "scale of %s %s: devices %s, kept %s, started %s, stopped %s%s",
            rt.name,
            "done" if ok else "failed",
            ", ".join(rt.devices),
            list(res.pids_kept),
            list(res.pids_started),
            list(res.pids_stopped),
            f": {reason}" if reason else "",
            extra={"model": rt.name},
        )
        if dep is not None:
            self.sup.ports.store.record(
                rt.state,
                dep,
                "scale",
                "committed" if ok else "rolled_back",
                reason=reason or None,
                devices=list(rt.devices),
                pids_kept=list(res.pids_kept),
                pids_started=list(res.pids_started),
                pids_stopped=list(res.pids_stopped),
                elapsed_s=round(res.elapsed_s, 3),
            )
        return res
