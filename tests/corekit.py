"""Drive the real ``pool.supervisor.Supervisor`` with events and a fake clock.

``Core`` builds a supervisor over a real state store in a temporary directory and a
GPU-less NVML; nothing else is faked, because the supervisor holds no router, spawner or
signal: it answers each event (``pool.events``) with commands (``pool.commands``).
``Core.feed`` plays the shell's part for the commands that expect an answer (a spawn's
token, an NVML reading, a pid probe, a CPU sample) and returns every command decided,
in order.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

from pool.commands import Command, ProbePid, SampleCpu, SampleMemory, Spawn
from pool.config import Config, ModelConfig, PoolConfig
from pool.events import (
    CpuSample,
    Event,
    MemorySample,
    Poll,
    SpawnAsked,
    WorkerMessage,
    WorkerSpawned,
    WorkerVanished,
)
from pool.gpu import Gpu
from pool.host_files import LocalFiles
from pool.lifecycle import WorkerRecord
from pool.ports import DeviceMemory, Ports
from pool.runtime import ModelRuntime
from pool.state import Deployed, StateStore
from pool.supervisor import Supervisor
from pool.worker_wire import decode

NO_SUCH_PID = 2**22 + 12345  # above pid_max on any Linux: never a live process
C = TypeVar("C")


class NoGpu(Gpu):
    """NVML absent, on any host: the supervisor's own readings come as MemorySample."""

    def _lib(self) -> Any:
        return None


class FakeQueues:
    """The router's queues as ``pool.ports.Queues``: requests waiting per model."""

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}
        self.failed: list[tuple[str, str, int]] = []  # (model, code, how many)

    def queue_len(self, model: str) -> int:
        return self.waiting.get(model, 0)

    def fail_queued(self, model: str, code: str, message: str) -> int:
        n = self.waiting.pop(model, 0)
        self.failed.append((model, code, n))
        return n


class Core:
    """``memory``: the devices' memory as the operations read it (``pool.ports``; NVML
    absent if None); ``store``: the state store (a real one in ``tmp_path`` if None)."""

    def __init__(
        self,
        tmp_path: Path,
        devices: tuple[str, ...] = ("cpu",),
        memory: DeviceMemory | None = None,
        store: StateStore | None = None,
        **pool: Any,
    ) -> None:
        self.now = 1000.0
        settings: dict[str, Any] = {"standby": False, "standby_preload": False, **pool}
        self.pool = PoolConfig(state_dir=str(tmp_path), **settings)
        self.model = ModelConfig(name="m", path=str(tmp_path / "m.pt"), devices=devices)
        config = Config(pool=self.pool, models=(self.model,), source=None)
        self.store = store = store or StateStore(str(tmp_path))
        gpu = NoGpu()
        self.memory = memory
        self.queues = FakeQueues()
        self.standby_forks: list[tuple[int, dict[str, Any]]] = []  # (token, spec) asked
        self.sup = Supervisor(
            config,
            Ports(
                store=store,
                memory=memory or gpu,
                queues=self.queues,
                spawner=self,
                files=LocalFiles(),
            ),
            "ipc:///nonexistent/backend.sock",
            "",
            -1,
        )
        self.tokens = count(1)
        self.token_of: dict[bytes, int] = {}
        self.live: set[int] = set()  # pids a ProbePid finds
        self.nvml: dict[int, dict[int, int]] = {}  # device index -> {pid: bytes}
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds /proc would say (absent: gone)
        self.feed(Poll(self.now))  # the supervisor's clock starts at ours
        first = Deployed("1", self.model.path, "d1")
        self.sup.add_model(self.model, devices, first, store.load("m"))
        self.started = self.answer(self.sup.take_commands())  # the first workers' spawns

    def standby(self, spec: dict[str, Any]) -> int:
        """The spawner port (``pool.ports.Spawner``): the token for a standby fork; a test
        (tests/opskit.py, tests/test_core_standby.py) answers it."""
        token = next(self.tokens)
        self.standby_forks.append((token, spec))
        return token

    @property
    def rt(self) -> ModelRuntime:
        return self.sup.models["m"]

    def feed(self, event: Event) -> list[Command]:
        return self.answer(self.sup.handle(event))

    def answer(self, commands: Iterable[Command]) -> list[Command]:
        """What the shell would do for the commands that want an answer; all, in order."""
        out: list[Command] = []
        for cmd in commands:
            out.append(cmd)
            follow: list[Command] = []
            if isinstance(cmd, Spawn):
                self.token_of[cmd.wid] = token = next(self.tokens)
                follow = self.sup.handle(SpawnAsked(cmd.wid, token, self.sup.now))
            elif isinstance(cmd, ProbePid) and cmd.pid not in self.live:
                follow = self.sup.handle(WorkerVanished(cmd.wid, self.sup.now))
            elif isinstance(cmd, SampleCpu):
                cpu = self.cpu.get(cmd.pid) if cmd.pid is not None else None
                follow = self.sup.handle(CpuSample(cmd.wid, cpu, self.sup.now))
            elif isinstance(cmd, SampleMemory):
                if self.memory is not None:
                    procs = {i: self.memory.process_bytes(i) for i in cmd.devices}
                else:
                    procs = {i: self.nvml.get(i) for i in cmd.devices}
                follow = self.sup.handle(MemorySample(procs, self.sup.now))
            out.extend(self.answer(follow))
        return out

    # --------------------------------------------------------------- the workers
    def newest(self) -> WorkerRecord:
        return self.rt.workers[-1]

    def spawned(self, rec: WorkerRecord, pid: int = NO_SUCH_PID) -> list[Command]:
        return self.feed(WorkerSpawned(self.token_of[rec.slot_view.wid], pid, self.now))

    def says(self, rec: WorkerRecord, **message: Any) -> list[Command]:
        # As the shell does: decoded at the edge, the core gets the record.
        return self.feed(WorkerMessage(rec.slot_view.wid, decode(message), self.now))

    def boot(self, rec: WorkerRecord | None = None, pid: int = NO_SUCH_PID) -> WorkerRecord:
        """The spawner's pid, hello, warming, ready: a serving worker."""
        rec = rec or self.newest()
        self.spawned(rec, pid)
        self.says(rec, t="hello", pid=pid)
        self.says(rec, t="phase", phase="warming")
        self.says(rec, t="ready", timings={"load_s": 0.1})
        return rec


def only(commands: Iterable[Command], kind: type[C]) -> list[C]:
    return [c for c in commands if isinstance(c, kind)]
