"""The hot standbys over fakes: alone (``Kit``), or in the real core's fake world.

``Kit.standbys`` is the real ``pool.standby.Standbys``; ``Kit.asked`` is every fork spec
the spawner port was asked for (token = position + 1), ``Kit.commands`` every command it
left (``Signal`` for a standby let go, ``RemoveDir`` for a run directory), ``Kit.now``
the time it reads.

``world`` starts the real supervisor (``LoggedCore``: tests/corekit.py, noting when each
standby fork was asked) in tests/opskit.py's world (``Beating``: with heartbeats and
loads that take a few ticks) and runs it until the model serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corekit import Core
from opskit import FakeDevices, Proc, World

from pool.commands import Command, Signal
from pool.events import WorkerMessage
from pool.host_files import LocalFiles
from pool.lifecycle import WorkerState
from pool.standby import StandbyRecord, Standbys, StandbyState
from pool.worker_wire import decode


class Kit:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.asked: list[dict[str, Any]] = []
        self.commands: list[Command] = []
        self.standbys = Standbys(self, LocalFiles(), -1, lambda: self.now, self.commands.append)

    def standby(self, spec: dict[str, Any]) -> int:
        """The spawner port: the token of the fork."""
        self.asked.append(spec)
        return len(self.asked)

    def signalled(self) -> list[int]:
        """The pids of the standbys let go (SIGTERM to their group), in order."""
        return [c.pid for c in self.commands if isinstance(c, Signal)]


class LoggedCore(Core):
    """A core whose spawner port notes when each standby fork was asked (fake time)."""

    def __init__(self, tmp_path: Path, devices: tuple[str, ...], **pool: Any) -> None:
        self.forks: list[tuple[float, str]] = []  # (time, device) of each fork asked
        super().__init__(tmp_path, devices, memory=FakeDevices(total=pool.pop("total", 80 << 30)),
                         watch_requests=0, **pool)  # fmt: skip

    def standby(self, spec: dict[str, Any]) -> int:
        self.forks.append((self.now, spec["device"]))
        return super().standby(spec)


class Beating(World):
    """The fake world, with every ready worker sending a heartbeat twice a second (the
    core would take a silent one for hung after a few seconds), and loads that take a
    few ticks (a heartbeat a turn while loading)."""

    last_beat = 0.0
    load_turns = 20

    def _load_script(self, proc: Proc, ok: bool) -> list[dict[str, Any]]:
        loading = [{"t": "hb", "pid": proc.pid}] * self.load_turns
        return loading + super()._load_script(proc, ok)

    def turn(self) -> None:
        super().turn()
        now = self.core.now
        if now - self.last_beat < 0.5:
            return
        self.last_beat = now
        for rec in list(self.core.rt.workers):
            if rec.state is WorkerState.READY and rec.pid in self.procs:
                beat = {"t": "hb", "pid": rec.pid, "served": 0, "model_errors": 0}
                self.feed(WorkerMessage(rec.slot_view.wid, decode(beat), now))


def world(tmp_path: Path, devices: tuple[str, ...] = ("cuda:0",), **pool: Any) -> World:
    pool.setdefault("standby", True)
    w = Beating(LoggedCore(tmp_path, devices, **pool))
    w.run_until(w.serving)
    return w


def forks(w: World) -> list[tuple[float, str]]:
    assert isinstance(w.core, LoggedCore)
    return w.core.forks


def waiting(w: World, device: str = "cuda:0") -> StandbyRecord:
    """The device's standby once it waits (its device up, no model)."""

    def found() -> StandbyRecord | None:
        rec = w.core.sup.standbys.current.get(device)
        return rec if rec is not None and rec.state is StandbyState.WAITING else None

    w.run_until(found, 30.0)
    rec = found()
    assert rec is not None and rec.pid is not None
    return rec
