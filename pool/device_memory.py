"""Device memory during an upgrade: how much room a second copy needs, and when a
retired worker's memory counts as back (NVML, sampled at each wait's own period).

Used memory is read without bare CUDA contexts (standbys, held workers:
``Supervisor.device_level``), so a standby on the device does not hide or fake a
returned model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pool.gpu import device_index
from pool.ports import DeviceMemory
from pool.runtime import ModelRuntime

if TYPE_CHECKING:
    from pool.supervisor import Supervisor

Clock = Callable[[], float]  # the core's: Supervisor.clock
Level = Callable[[str], int | None]  # a device's used bytes: Supervisor.device_level

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


def device_level(memory: DeviceMemory, device: str, context_pids: set[int]) -> int | None:
    """NVML's used bytes on ``device`` minus those of ``context_pids`` (processes that
    hold a CUDA context and no model: standbys, and a taken one staging weights)."""
    idx = device_index(device)
    if idx is None:
        return None
    mem = memory.memory(idx)
    if mem is None:
        return None
    if not context_pids:
        return mem[0]
    procs = memory.process_bytes(idx) or {}
    return mem[0] - sum(procs.get(pid, 0) for pid in context_pids)


def settled(level: Level, devices: list[str]) -> Callable[[], bool]:
    """A condition: two readings in a row (one wait period apart) are equal."""
    last: dict[str, int | None] = {}

    def check() -> bool:
        now = {d: level(d) for d in devices}
        same = now == last
        last.clear()
        last.update(now)
        return same

    return check


def back_at(level: Level, reference: dict[str, int | None], clock: Clock) -> Callable[[], bool]:
    """A condition: every device's level is within MEMORY_TOLERANCE of ``reference``, or
    has not moved for SETTLE_EVERY_S (another process changed the level: the proof then
    fails, but the held clients do not wait the whole settle timeout for it)."""
    since: dict[str, tuple[int | None, float]] = {}

    def check() -> bool:
        t = clock()
        back = True
        for dev, ref in reference.items():
            now = level(dev)
            if ref is None or now is None or abs(now - ref) <= MEMORY_TOLERANCE:
                continue
            seen, at = since.get(dev, (None, t))
            if seen != now:
                since[dev] = (now, t)
                back = False
            elif t - at < SETTLE_EVERY_S:
                back = False
        return back

    return check



def choose_strategy(sup: Supervisor, rt: ModelRuntime) -> tuple[str, str]:
    """(strategy, why) for ``auto``."""
    gpus = [(d, device_index(d)) for d in rt.devices]
    if all(idx is None for _, idx in gpus):
        return "surge", "CPU devices always surge"
    need: dict[int, int] = {}
    for rec in rt.alive(rt.serving_gen):
        idx = device_index(rec.device)
        if idx is not None:
            procs = sup.ports.memory.process_bytes(idx) or {}  # read now: a cached sample can lag
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
        mem = sup.ports.memory.memory(idx)
        if mem is None:
            return "drain-first", f"NVML cannot read cuda:{idx}"
        if mem[1] < foot + margin:
            return "drain-first", (
                f"cuda:{idx} has {mem[1] >> 20} MiB free, needs "
                f"{(foot + margin) >> 20} MiB for a second copy"
            )
    return "surge", "room for both versions on every device"


def device_used(sup: Supervisor, device: str) -> int | None:
    """Used memory without bare contexts (standbys): ``Supervisor.device_level``."""
    return sup.device_level(device)

