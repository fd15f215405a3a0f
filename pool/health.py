"""How the pool is doing, per model, in one immutable record the loop publishes.

Degraded, not dead: one model that cannot load must not hold the healthy ones hostage.
The pool is *settled* (systemd gets READY=1) once every model either serves or has
failed at least one boot, so a broken model delays readiness by one boot attempt, not
by its whole restart storm. ``/readyz`` answers 200 while any model serves, with one
line per model naming what failed; ``pool-ctl health`` stays strict (every model).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pool.lifecycle import WorkerState
from pool.runtime import ModelRuntime

GOOD = frozenset({"serving", "upgrading"})


@dataclass(frozen=True)
class ModelHealth:
    name: str
    state: str  # ModelRuntime.status()
    ready: int  # ready workers of the serving generation
    slots: int
    reason: str  # why it does not serve ("" when it does)

    @property
    def serving(self) -> bool:
        return self.state in GOOD and self.ready > 0

    def line(self) -> str:
        head = f"{self.name}: {self.state} ({self.ready}/{self.slots} workers ready)"
        return head + (f": {self.reason}" if self.reason else "")


@dataclass(frozen=True)
class PoolHealth:
    models: tuple[ModelHealth, ...]
    settled: bool  # every model serves or has failed a boot: time for READY=1

    @property
    def broken(self) -> tuple[ModelHealth, ...]:
        return tuple(m for m in self.models if not m.serving)

    @property
    def any_serving(self) -> bool:
        return any(m.serving for m in self.models)

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        n, bad = len(self.models), self.broken
        if not bad:
            return f"serving {n} model(s)"
        names = "; ".join(f"{m.name} {m.state}: {m.reason or 'no ready worker'}" for m in bad)
        return f"degraded: serving {n - len(bad)} of {n} model(s); {names}"[:400]

    def body(self) -> str:
        """The /readyz body: the summary, then one line per model."""
        return "\n".join([self.summary(), *(m.line() for m in self.models)])


def assess(models: Iterable[ModelRuntime]) -> PoolHealth:
    out: list[ModelHealth] = []
    settled = True
    for rt in models:
        state = rt.status()
        ready = sum(
            w.state is WorkerState.READY and w.generation == rt.serving_gen for w in rt.workers
        )
        reason = ""
        if not (state in GOOD and ready):
            reason = rt.failed or rt.last_failure or ""
            if not rt.failed and not rt.last_failure and state != "unloading":
                settled = False  # still on its first boot: wait for it
        out.append(ModelHealth(rt.name, state, ready, len(rt.devices), reason))
    return PoolHealth(tuple(out), settled)
