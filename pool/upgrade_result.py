"""What one upgrade, rollback or recycle did: a typed record, turned into JSON at the edge.

Like circus's ``Watcher.reload``, it says which pids were stopped, started and kept;
with the time spent in each phase (``pool.upgrade_phases``) and each measured step, the
bytes each device got back, and the restore's own outcome when a failure needed one.
``to_json`` is the reply pool-ctl prints and the fields the history entry keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from pool.upgrade_phases import UpgradePhase


class Restore(NamedTuple):
    """What putting the old version back achieved: a failed upgrade is ``rolled_back``
    only when this is ok, else ``restore_failed`` (the model serves less than before)."""

    ok: bool
    reason: str = ""  # the first worker of the old version that would not boot, and why


@dataclass(frozen=True)
class UpgradeResult:
    ok: bool
    model: str
    action: str  # upgrade | rollback | recycle | scale | ...
    outcome: UpgradePhase  # a terminal phase: committed, rolled_back, restore_failed
    strategy: str
    from_version: str
    target_version: str
    digest: str
    generation: int  # the serving generation afterwards
    pids_started: tuple[int | None, ...]
    pids_stopped: tuple[int | None, ...]
    pids_kept: tuple[int | None, ...]  # the model's workers before and after, untouched
    path: tuple[UpgradePhase, ...]  # the phases it went through, in order
    phase_s: Mapping[UpgradePhase, float]  # seconds spent in each phase
    steps_s: Mapping[str, float]  # measured steps: boot_s, drain_s, retire_s, watch_s, ...
    worker_timings: Mapping[str, float]  # a new worker's own load / warm-up times
    bytes_freed: Mapping[str, int]  # per device
    memory_back: bool | None  # each device back within tolerance; None: not measured
    standbys_taken: int
    staged: bool
    elapsed_s: float
    contract: str
    watch: str
    restore: Restore | None
    reason: str  # "" when ok
    devices: tuple[str, ...] | None = None  # set by the callers that move a model's devices

    @property
    def to_version(self) -> str:
        return self.target_version if self.ok else self.from_version

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "model": self.model,
            "action": self.action,
            "outcome": self.outcome.value,
            "strategy": self.strategy,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "target_version": self.target_version,
            "digest": self.digest,
            "generation": self.generation,
            "pids_started": list(self.pids_started),
            "pids_stopped": list(self.pids_stopped),
            "pids_kept": list(self.pids_kept),
            "phases": {k: round(v, 4) for k, v in self.steps_s.items()},
            "phase_s": {p.value: round(v, 4) for p, v in self.phase_s.items()},
            "worker_timings": {k: round(v, 4) for k, v in self.worker_timings.items()},
            "bytes_freed": dict(self.bytes_freed),
            "memory_back": self.memory_back,
            "standby": {"taken": self.standbys_taken, "staged": self.staged},
            "elapsed_s": round(self.elapsed_s, 3),
            "contract": self.contract,
            "watch": self.watch,
            "restore": self.restore._asdict() if self.restore is not None else None,
            "path": [p.value for p in self.path],
        }
        if not self.ok:
            out["reason"] = self.reason
        if self.devices is not None:
            out["devices"] = list(self.devices)
        return out
