"""poold's side of the hot standbys: one per device that wants one (``workers.standby``).

A standby is forked through the spawner ahead of need. When a worker is spawned on its
device (upgrade, crash replacement, recycle, rollback) the supervisor takes the standby
instead of forking a fresh process, and this module forks the next one behind it, but
only once nothing is booting on that device and no operation of a model there runs:
the new standby's CUDA init would compete with the load it is meant to speed up, and a
context appearing mid-operation would move the memory levels an upgrade compares. A
standby that dies is replaced, with the same back-off as a crashing worker.

Part of the decision core (issue 16): the spawner is asked through the ``Spawner`` port
(``pool.ports``: a take may name a fork by its token before its pid is known), a standby
let go is a ``Signal`` command and its run directory a ``RemoveDir`` (``emit``: the
supervisor's outbox), NVML's per-process bytes come in with the supervisor's
``MemorySample``, and the time is the core's clock. ``tests/test_core_standby.py``
drives it with fakes.

Memory accounting: a standby (or a taken standby still staging weights on the host)
holds a CUDA context and nothing else. ``pool.device_memory.device_level`` is NVML's
used memory minus what NVML shows for those context-only processes (``pids``), so the
retire proof compares model memory, whatever standbys came and went between its two
readings.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from itertools import count
from typing import Any

from pool.commands import Command, RemoveDir, Signal, Taken
from pool.flapping import FlapGuard
from pool.gpu import device_index
from pool.lifecycle import IllegalTransition, describe_exit
from pool.ports import HostFiles, Spawner
from pool.preload import PreloadRecord, PreloadSpec, PreloadState, admit

log = logging.getLogger(__name__)

Clock = Callable[[], float]  # the core's: Supervisor.clock
Emit = Callable[[Command], None]  # the supervisor's outbox: Supervisor.emit


class StandbyState(StrEnum):
    FORKING = "forking"  # asked the spawner
    PREPARING = "preparing"  # has a pid; bringing its device up
    WAITING = "waiting"  # device up, no model: ready to be taken
    TAKEN = "taken"  # became a worker (the worker's record owns the pid now)
    EXITED = "exited"  # died or was let go before it was taken


TRANSITIONS: dict[StandbyState, frozenset[StandbyState]] = {
    StandbyState.FORKING: frozenset(
        {StandbyState.PREPARING, StandbyState.TAKEN, StandbyState.EXITED}
    ),
    StandbyState.PREPARING: frozenset(
        {StandbyState.WAITING, StandbyState.TAKEN, StandbyState.EXITED}
    ),
    StandbyState.WAITING: frozenset({StandbyState.TAKEN, StandbyState.EXITED}),
    StandbyState.TAKEN: frozenset(),
    StandbyState.EXITED: frozenset(),
}


@dataclass
class StandbyRecord:
    sid: str
    device: str
    state: StandbyState = StandbyState.FORKING
    pid: int | None = None
    token: int = 0  # the spawner's token for its fork
    forked_at: float = 0.0  # the core's clock
    ready_at: float | None = None
    prep_s: float | None = None
    gpu_bytes: int | None = None  # NVML, per process: its context
    preload: PreloadRecord | None = None  # the version it reads ahead (pool.preload)

    @property
    def preload_bytes(self) -> int:
        """Host bytes of the version it holds (0: none, or not read yet)."""
        pre = self.preload
        return pre.bytes if pre is not None and pre.state is PreloadState.LOADED else 0

    def to(self, new: StandbyState) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"standby {self.sid}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def alive(self) -> bool:
        return self.state not in (StandbyState.TAKEN, StandbyState.EXITED)

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "device": self.device,
            "state": self.state.value,
            "pid": self.pid,
            "gpu_bytes": self.gpu_bytes,
            "prep_s": None if self.prep_s is None else round(self.prep_s, 3),
            "age_s": round(now - self.forked_at, 1),
            "preload": None if self.preload is None else self.preload.describe(),
        }


class Standbys:
    """The standby records of every device, and when to fork the next one."""

    def __init__(
        self, spawner: Spawner, files: HostFiles, lifeline_fd: int, clock: Clock, emit: Emit
    ) -> None:
        self.spawner = spawner
        self.files = files
        self.lifeline_fd = lifeline_fd
        self.clock = clock
        self.emit = emit
        self.wanted: set[str] = set()
        self.current: dict[str, StandbyRecord] = {}  # device -> its live standby
        self.by_token: dict[int, StandbyRecord] = {}
        self.by_pid: dict[int, StandbyRecord] = {}
        self.flap: dict[str, FlapGuard] = {}
        self.next_try: dict[str, float] = {}
        self.given_up: dict[str, str] = {}  # device -> why no standby is forked there
        self.taken: dict[str, int] = {}  # device -> standbys taken (counter)
        self.died: dict[str, int] = {}  # device -> standbys lost before being taken
        self.sids = count(1)
        self.closed = False  # poold is stopping: no standby is wanted any more
        # The version a standby on a device should preload (pool.preload); set by the
        # supervisor. None: no preload there.
        self.preload_target: Callable[[str], PreloadSpec | None] = lambda device: None
        self.preload_refused: dict[str, str] = {}  # device -> why its standby has none
        self.run_dirs: dict[int, str] = {}  # pid of a taken standby -> its run directory

    # ----------------------------------------------------------------- forking
    def want(self, devices: Iterable[str]) -> None:
        """The devices that should have a standby; one on any other device is let go."""
        self.wanted = set() if self.closed else set(devices)
        for device in [d for d in self.current if d not in self.wanted]:
            rec = self.current.pop(device)
            log.info("standby %s [pid %s] no longer wanted on %s", rec.sid, rec.pid, device)
            self._signal(rec)

    def _signal(self, rec: StandbyRecord) -> None:
        """SIGTERM a standby's group (it leads its own); its exit is reaped as usual.
        One still forking has no pid yet: the spawner's answer finds it gone."""
        if rec.pid is not None:
            self.emit(Signal(rec.pid, signal.SIGTERM, 0))

    def tick(self, now: float, busy_devices: set[str]) -> None:
        """Fork a standby on every wanted device that has none and is not busy; let a
        standby go whose preload is no longer the version to preload (pool.preload)."""
        for device, rec in list(self.current.items()):
            if rec.preload is None or device in busy_devices:
                continue
            target = self.preload_target(device)
            if target is None or target.key != rec.preload.spec.key:
                log.info(
                    "standby %s [pid %s]: its preload %s is stale; replacing it",
                    rec.sid,
                    rec.pid,
                    rec.preload.spec.key,
                )
                del self.current[device]
                self._signal(rec)
        for device in sorted(self.wanted):
            live = self.current.get(device)
            if live is not None and live.alive:
                continue
            if device in busy_devices or device in self.given_up:
                continue
            if now < self.next_try.get(device, 0.0):
                continue
            self._fork(device)

    def _fork(self, device: str, preload: bool = True) -> None:
        sid = f"standby.{device}.{next(self.sids)}"
        rec = StandbyRecord(sid=sid, device=device, forked_at=self.clock())
        self.current[device] = rec
        spec: dict[str, Any] = {"sid": rec.sid, "device": device, "lifeline_fd": self.lifeline_fd}
        target = self.preload_target(device) if preload else None
        if target is not None:
            ok, why = admit(target, self.files)
            if ok:
                run_dir = os.path.join(target.run_root, rec.sid)
                rec.preload = PreloadRecord(target, run_dir, since=self.clock())
                spec["preload"] = target.to_wire(rec.preload.run_dir)
                self.preload_refused.pop(device, None)
            else:
                self.preload_refused[device] = why
        token = self.spawner.standby(spec)
        rec.token = token
        self.by_token[token] = rec
        log.info("forking standby %s on %s", rec.sid, device)

    # ----------------------------------------------------------------- taking
    def take(self, device: str, path: str = "", key: str = "") -> Taken | None:
        """The device's standby for a worker of ``path`` (``key``: its preload key); it
        is no longer ours. With none there, one is forked and taken at once, so that
        every worker on a standby device starts the same way (and has the same
        footprint). None: this device gets no standbys."""
        rec = self.current.get(device)
        pre = rec.preload if rec is not None and rec.alive else None
        if rec is not None and pre is not None and not pre.spec.readable(path, self.files):
            log.info("standby %s: its sandbox cannot read %s; forking another", rec.sid, path)
            del self.current[device]
            self._signal(rec)
            rec = None
            if not (device in self.given_up or self.closed):
                self._fork(device, preload=False)
        if rec is None or not rec.alive:
            if device in self.given_up or self.closed:
                return None
            if device not in self.current:
                self._fork(device)
            rec = self.current[device]
        waited = rec.state is StandbyState.WAITING
        pre = rec.preload
        preloaded = pre is not None and pre.state is PreloadState.LOADED and pre.spec.key == key
        rec.to(StandbyState.TAKEN)
        del self.current[device]
        self.taken[device] = self.taken.get(device, 0) + 1
        # by_pid keeps it until the spawner says whether the take happened ("took"):
        # a standby that died just before is reaped as a standby, not as the worker.
        return Taken(rec.pid, rec.token, rec.sid, waited, preloaded)

    def took(self, pid: int, used: bool) -> None:
        """The spawner's answer to a take: ``used`` False means it forked afresh."""
        rec = self.by_pid.get(pid)
        if rec is not None and rec.state is StandbyState.TAKEN and used:
            del self.by_pid[pid]
            if rec.preload is not None:  # the worker keeps the standby's run directory
                self.run_dirs[pid] = rec.preload.run_dir

    def worker_exited(self, pid: int) -> None:
        """A worker's exit: remove the run directory of the standby it was, if any."""
        run_dir = self.run_dirs.pop(pid, None)
        if run_dir:
            self.emit(RemoveDir(run_dir))

    def available(self, device: str) -> bool:
        """Whether a spawn on ``device`` would start in a standby (one there or forked)."""
        return device not in self.given_up and not self.closed

    def waiting(self, device: str) -> StandbyRecord | None:
        rec = self.current.get(device)
        return rec if rec is not None and rec.alive and rec.pid is not None else None

    # ----------------------------------------------------------------- spawner news
    def on_spawned(self, token: int, pid: int) -> bool:
        rec = self.by_token.pop(token, None)
        if rec is None:
            return False
        rec.pid = pid
        self.by_pid[pid] = rec
        if rec.state is StandbyState.TAKEN:
            return True  # taken as it was forked: the "took" for its take follows
        rec.to(StandbyState.PREPARING)
        if self.current.get(rec.device) is not rec:
            self._signal(rec)  # let go while it was forking
        return True

    def on_spawn_failed(self, token: int, reason: str) -> bool:
        rec = self.by_token.pop(token, None)
        if rec is None:
            return False
        self._lost(rec, reason)
        return True

    def on_preloaded(self, msg: dict[str, Any]) -> None:
        rec = self.by_pid.get(int(msg.get("pid") or 0))
        if rec is None or rec.preload is None:
            return
        rec.preload.on_report(msg)
        pre = rec.preload
        if pre.state is PreloadState.FAILED:
            log.warning("standby %s [pid %s]: preload failed: %s", rec.sid, rec.pid, pre.reason)
        else:
            log.info(
                "standby %s [pid %s] holds %s v%s on the host (%d MiB in %.2fs)",
                rec.sid,
                rec.pid,
                pre.spec.model,
                pre.spec.version,
                pre.bytes >> 20,
                pre.load_s or 0.0,
            )

    def on_ready(self, msg: dict[str, Any]) -> None:
        rec = self.by_pid.get(int(msg.get("pid") or 0))
        if rec is None or rec.state is not StandbyState.PREPARING:
            return
        rec.to(StandbyState.WAITING)
        rec.ready_at = self.clock()
        prep = msg.get("prep_s")
        rec.prep_s = float(prep) if isinstance(prep, int | float) else None
        self.flap.setdefault(rec.device, FlapGuard()).reset()
        log.info(
            "standby %s [pid %s] on %s waiting (device up in %.2fs)",
            rec.sid,
            rec.pid,
            rec.device,
            rec.prep_s or 0.0,
        )

    def on_exited(self, pid: int, status: int) -> bool:
        """A standby's exit; False when ``pid`` is not a standby's."""
        rec = self.by_pid.pop(pid, None)
        if rec is None:
            return False
        if rec.preload is not None:
            self.emit(RemoveDir(rec.preload.run_dir))
        if rec.state is StandbyState.TAKEN:
            return True  # taken just as it died: the spawner forked a worker instead
        self._lost(rec, describe_exit(status))
        return True

    def _lost(self, rec: StandbyRecord, how: str) -> None:
        was = rec.state
        if rec.alive:
            rec.to(StandbyState.EXITED)
        if self.current.get(rec.device) is not rec:
            log.info("standby %s [pid %s] gone: %s", rec.sid, rec.pid, how)  # let go
            return
        del self.current[rec.device]
        self.died[rec.device] = self.died.get(rec.device, 0) + 1
        delay = self.flap.setdefault(rec.device, FlapGuard()).failure(self.clock())
        if delay is None:
            why = f"standbys on {rec.device} keep dying; last: {how}"
            self.given_up[rec.device] = why
            log.error("%s; no more standbys there (workers start cold)", why)
            return
        self.next_try[rec.device] = self.clock() + delay
        log.warning(
            "standby %s [pid %s] on %s died while %s: %s; another in %.1fs",
            rec.sid,
            rec.pid,
            rec.device,
            was.value,
            how,
            delay,
        )

    # ----------------------------------------------------------------- memory, status
    def devices(self) -> set[int]:
        """The device indexes whose NVML sample would tell a standby's context size."""
        indexes = {device_index(r.device) for r in self.current.values() if r.pid is not None}
        return {i for i in indexes if i is not None}

    def memory_sampled(self, processes: Mapping[int, Mapping[int, int] | None]) -> None:
        """The supervisor's ``MemorySample``: each standby's context, in bytes."""
        for rec in self.current.values():
            idx = device_index(rec.device)
            procs = processes.get(idx) if idx is not None else None
            if procs is not None and rec.pid is not None:
                rec.gpu_bytes = procs.get(rec.pid)

    def pids(self, device: str) -> set[int]:
        rec = self.current.get(device)
        return {rec.pid} if rec is not None and rec.alive and rec.pid is not None else set()

    def stop_all(self) -> None:
        """Let every standby go (poold is stopping; the spawner's exit would do it too)."""
        self.closed = True
        self.want(())

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [r.describe(now) for r in self.current.values() if r.alive]

    def summary(self) -> dict[str, Any]:
        return {
            "wanted": sorted(self.wanted),
            "standbys": self.describe(),
            "taken": dict(self.taken),
            "died": dict(self.died),
            "given_up": dict(self.given_up),
            "preload_refused": dict(self.preload_refused),
        }

