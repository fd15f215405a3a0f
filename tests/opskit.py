"""Drive the real core and its real operations over a fake world: no process, no sleep.

``World`` plays what poold's loop and the outside would do around a ``corekit.Core``:
the spawner (a pid for each ``Spawn``, a standby for each fork asked, the ``took`` of a
take), the workers (hello, loading, warming, ready, or a failed load and exit 64, as
``fate`` says; a held worker stages and waits for ``go``; a worker told to stop, or
signalled, exits), the state store (``Record``, ``SaveState``), the devices
(``FakeDevices``: NVML for cuda:0 and cuda:1), and the loop's ``Tick`` every 50 ms
and ``Poll`` between, on a fake clock one ``STEP_S`` a turn.
The supervisor, its scheduler and every operation (``pool.upgrade``, ``pool.manage``,
``pool.reload``) are the real ones.
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from corekit import Core

from pool.commands import Activate, Command, Record, SaveState, SendControl, Signal, Spawn
from pool.events import (
    Event,
    Poll,
    SpawnerMessage,
    Tick,
    WorkerExited,
    WorkerMessage,
    WorkerSpawned,
)
from pool.gpu import device_index
from pool.op_result import OpResult
from pool.operations import start_operation
from pool.state import Deployed
from pool.upgrade import Upgrade
from pool.upgrade_result import UpgradeResult
from pool.worker_wire import decode

MiB = 1 << 20
BASE = 600 * MiB  # what the driver itself holds on a device
CTX = 500 * MiB  # a CUDA context: a standby, or a worker before it has loaded
MODEL = 1500 * MiB  # a loaded model
STEP_S = 0.01  # one loop turn of fake time
TICK_S = 0.05
FIRST_PID = 2**22 + 20_000  # above any pid_max: a signal to one can reach no process

Fate = Callable[[dict[str, Any]], bool]  # a worker's spawn spec -> does it load


class FakeDevices:
    """NVML as ``pool.ports.DeviceMemory``: per device index, the bytes of each process."""

    def __init__(self, count: int = 2, total: int = 80 << 30) -> None:
        self.held: dict[int, dict[int, int]] = {i: {} for i in range(count)}
        self.total = total
        self.queries = 0
        self.leak: dict[int, int] = {}  # bytes an exited process left behind, per device

    def memory(self, index: int) -> tuple[int, int, int] | None:
        self.queries += 1
        used = BASE + sum(self.held[index].values()) + self.leak.get(index, 0)
        return used, self.total - used, self.total

    def process_bytes(self, index: int) -> dict[int, int] | None:
        self.queries += 1
        return dict(self.held[index])

    def put(self, device: str, pid: int, nbytes: int) -> None:
        idx = device_index(device)
        if idx is not None:
            self.held[idx][pid] = self.held[idx].get(pid, 0) + nbytes

    def free(self, pid: int) -> None:
        for procs in self.held.values():
            procs.pop(pid, None)


@dataclass
class Proc:
    """One fake process: a worker (``wid``), or a standby until it is taken."""

    pid: int
    device: str
    wid: bytes = b""
    script: deque[dict[str, Any]] = field(default_factory=deque)  # what it says next
    held: bool = False  # staged, waiting for "go"
    exit_status: int | None = None  # set: it exits next turn


class World:
    def __init__(self, core: Core, fate: Fate = lambda spec: True) -> None:
        self.core = core
        self.fate = fate
        self.devices = core.memory if isinstance(core.memory, FakeDevices) else FakeDevices()
        self.pids = count(FIRST_PID)
        self.procs: dict[int, Proc] = {}
        self.by_wid: dict[bytes, Proc] = {}
        self.commands: list[Command] = []  # everything the core decided, in order
        self.fork_pid: dict[int, int] = {}  # a standby fork's token -> its pid
        self.last_tick = core.now
        self.take(core.started)
        self.answer_standby_forks()

    # ------------------------------------------------------------ the core's side
    def feed(self, event: Event) -> None:
        self.take(self.core.feed(event))

    def take(self, commands: list[Command]) -> None:
        for cmd in commands:
            self.commands.append(cmd)
            match cmd:
                case Spawn(wid, spec, standby):
                    self._spawned(wid, spec, standby)
                case SendControl(wid, message):
                    proc = self.by_wid.get(wid)
                    if proc is not None and message.get("t") == "stop":
                        proc.exit_status = 0
                    elif proc is not None and message.get("t") == "go" and proc.held:
                        proc.held = False
                        proc.script.extend(self._load_script(proc, True))
                case Record(state, deployed, action, outcome, generation):
                    self.core.store.record(state, deployed, action, outcome, generation=generation)
                case SaveState(state):
                    self.core.store.save(state)
                case Signal(pid, sig, _):
                    proc = self.procs.get(pid)
                    if proc is not None and sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGABRT):
                        proc.exit_status = sig  # a wait status: killed by ``sig``

    def answer_standby_forks(self) -> None:
        """The spawner forks each standby asked: its pid, then its device is up."""
        while self.core.standby_forks:
            token, spec = self.core.standby_forks.pop(0)
            pid = self.fork_pid[token] = next(self.pids)
            self.procs[pid] = Proc(pid, spec["device"])
            self.devices.put(spec["device"], pid, CTX)
            self.feed(WorkerSpawned(token, pid, self.core.now))
            ready = {"t": "standby_ready", "pid": pid, "sid": spec["sid"], "prep_s": 0.2}
            self.feed(SpawnerMessage(ready, self.core.now))

    def _spawned(self, wid: bytes, spec: dict[str, Any], standby: Any) -> None:
        token = self.core.token_of[wid]
        if standby is not None:
            pid = standby.pid
            if pid is None:  # taken as it was forked: the fork's answer first
                self.answer_standby_forks()
                pid = self.fork_pid[standby.token]
            proc = self.procs.pop(pid)
            took = {"t": "took", "token": token, "pid": pid, "standby": True}
            self.feed(SpawnerMessage(took, self.core.now))
        else:
            pid = next(self.pids)
            proc = Proc(pid, spec["device"])
            self.devices.put(spec["device"], pid, CTX)
        proc.wid = wid
        self.procs[pid] = proc
        self.by_wid[wid] = proc
        self.core.live.add(pid)
        proc.script.append({"spawned": True})
        proc.script.append({"t": "hello", "pid": pid})
        ok = self.fate(spec)
        if spec.get("hold_device") and ok:
            proc.script.append({"t": "phase", "phase": "staged"})
            proc.held = True
        else:
            proc.script.extend(self._load_script(proc, ok))

    def _load_script(self, proc: Proc, ok: bool) -> list[dict[str, Any]]:
        if not ok:
            return [{"t": "failed", "stage": "load", "reason": "it would not load"}, {"exit": 64}]
        return [
            {"t": "phase", "phase": "warming", "loaded": True},
            {"t": "ready", "timings": {"load_s": 0.1}},
        ]

    # ------------------------------------------------------------------- a turn
    def turn(self) -> None:
        core = self.core
        core.now = round(core.now + STEP_S, 6)
        for proc in list(self.procs.values()):
            if proc.exit_status is not None:
                self._exit(proc, proc.exit_status)
            elif proc.script and proc.wid:
                self._say(proc, proc.script.popleft())
        if core.now - self.last_tick >= TICK_S - 1e-9:
            self.last_tick = core.now
            self.feed(Tick(core.now))
        else:
            self.feed(Poll(core.now))
        self.take(core.answer(core.sup.take_commands()))
        self.answer_standby_forks()

    def _say(self, proc: Proc, line: dict[str, Any]) -> None:
        if line.get("spawned"):
            self.feed(WorkerSpawned(self.core.token_of[proc.wid], proc.pid, self.core.now))
        elif "exit" in line:
            self._exit(proc, line["exit"] << 8)
        else:
            if line.pop("loaded", False):
                self.devices.put(proc.device, proc.pid, MODEL)
            self.feed(WorkerMessage(proc.wid, decode(line), self.core.now))

    def _exit(self, proc: Proc, status: int) -> None:
        self.procs.pop(proc.pid, None)
        self.devices.free(proc.pid)
        self.core.live.discard(proc.pid)
        proc.exit_status = None
        self.feed(WorkerExited(proc.pid, status, self.core.now))

    def run_until(self, done: Callable[[], object], most_s: float = 120.0) -> None:
        end = self.core.now + most_s
        while not done():
            if self.core.now > end:
                raise AssertionError(f"not done within {most_s} s of fake time")
            self.turn()

    # --------------------------------------------------------------- operations
    def serving(self) -> bool:
        return bool(self.core.rt.workers) and all(
            w.state.value == "ready" for w in self.core.rt.workers
        )

    def operate(self, name: str, op: Any) -> OpResult:
        """Start ``op`` as poold's control server does and run the world until it ends."""
        results: list[OpResult] = []
        start_operation(self.core.sup, self.core.rt, name, op, results.append)
        self.take(self.core.answer(self.core.sup.take_commands()))
        self.run_until(lambda: results)
        return results[0]

    def upgrade(self, version: str, strategy: str, **kw: Any) -> UpgradeResult:
        target = Deployed(version, f"/models/m/{version}.pt", f"d{version}")
        up = Upgrade(self.core.sup, self.core.rt, target, strategy, 60.0, "upgrade", _quiet)
        for key, value in kw.items():
            setattr(up, key, value)
        result = self.operate("upgrade", up.run())
        assert isinstance(result, UpgradeResult), result
        return result

    def activations(self) -> list[int]:
        """The generation of every routing-table assignment, in order."""
        return [c.generation for c in self.commands if isinstance(c, Activate)]


def _quiet(*_: Any, **__: Any) -> None:
    pass
