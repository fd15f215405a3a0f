"""Drive ``pool.upgrade.Upgrade`` in-process: a fake supervisor, a fake clock, no processes.

``FakeSupervisor`` does what the real one does to a worker's state, at once: a spawned
worker boots to READY (or FAILED, as its ``fate`` says), a retired or killed one exits.
``FakeGpu`` counts NVML queries. The operation runs under the real ``pool.tasks``
scheduler, with ``FakeClock`` as its clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pool.config import ModelConfig, PoolConfig
from pool.host_files import LocalFiles
from pool.lifecycle import WorkerRecord, WorkerState
from pool.ports import Ports
from pool.runtime import ModelRuntime
from pool.state import Deployed, ModelState
from pool.tasks import Operation, Scheduler
from router.table import ModelRoute, WorkerSlot

BOOT = (WorkerState.STARTING, WorkerState.LOADING, WorkerState.WARMING)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeGpu:
    used: int = 8 << 30
    queries: int = 0

    def memory(self, idx: int) -> tuple[int, int] | None:
        self.queries += 1
        return self.used, 80 << 30

    def process_bytes(self, idx: int) -> dict[int, int] | None:
        self.queries += 1
        return {}


@dataclass
class Recorded:
    outcomes: list[str] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)

    def record(self, state: Any, target: Any, action: str, outcome: str, **extra: Any) -> None:
        self.outcomes.append(outcome)
        self.extra.append(extra)

    def commit_current(self, state: ModelState, deployed: Deployed) -> None:
        state.current = deployed  # the real one writes it to disk first


class _NoQueues:
    def queue_len(self, model: str) -> int:
        return 0

    def fail_queued(self, model: str, code: str, message: str) -> int:
        return 0


class _NoSpawner:
    def standby(self, spec: dict[str, Any]) -> int:
        raise AssertionError("an upgrade forks no standby of its own")


class FakeSupervisor:
    """The part of ``pool.supervisor.Supervisor`` an ``Upgrade`` calls."""

    def __init__(self, devices: tuple[str, ...], fate: Callable[[WorkerRecord], bool]) -> None:
        self.pool = PoolConfig(watch_requests=0)
        self.time = FakeClock()  # the core's clock; run() puts its own here
        self.gpu = FakeGpu()
        self.store = Recorded()
        self.emitted: list[Any] = []  # commands an Upgrade left (ObserveUpgrade)
        self.fate = fate  # spawned worker -> does it become ready
        self.pids = iter(range(100, 10_000))
        cfg = ModelConfig(name="m", path="/models/m/1.pt", devices=devices)
        route = ModelRoute("m", cfg.max_queue, cfg.request_timeout_s, True)
        self.rt = ModelRuntime(cfg=cfg, route=route, state=ModelState("m"), devices=devices)
        gen = self.new_generation(self.rt, Deployed("1", "/models/m/1.pt", "d1"))
        self.rt.serving_gen = gen
        for slot in range(len(devices)):
            self.boot(self.spawn(self.rt, gen, slot), True)
        self.activations: list[int] = []

    @property
    def now(self) -> float:
        return self.time.now

    def clock(self) -> float:
        return self.time.now

    @property
    def ports(self) -> Ports:
        # Read at each use: a test may swap ``gpu`` or ``store``.
        return Ports(
            store=self.store,  # type: ignore[arg-type]
            memory=self.gpu,  # type: ignore[arg-type]
            queues=_NoQueues(),
            spawner=_NoSpawner(),
            files=LocalFiles(),
        )

    def emit(self, command: Any) -> None:
        self.emitted.append(command)

    def new_generation(self, rt: ModelRuntime, deployed: Deployed) -> int:
        gen = next(rt.gen_counter)
        rt.gens[gen] = deployed
        return gen

    def spawn(self, rt: ModelRuntime, gen: int, slot: int, hold: bool = False) -> WorkerRecord:
        dep = rt.gens[gen]
        wid = f"m.g{gen}.s{slot}.w{len(rt.workers) + 1}"
        rec = WorkerRecord(
            wid=wid,
            model="m",
            generation=gen,
            slot=slot,
            device=rt.devices[slot],
            version=dep.version,
            path=dep.path,
            slot_view=WorkerSlot(wid.encode(), "m", gen, dep.version, 2),
            pid=next(self.pids),
        )
        rt.workers.append(rec)
        if getattr(self, "activations", None) is not None:  # not the first generation
            self.boot(rec, self.fate(rec))
        return rec

    def boot(self, rec: WorkerRecord, ready: bool) -> None:
        for state in BOOT:
            rec.to(state)
        if ready:
            rec.to(WorkerState.READY)
        else:
            rec.failure = "load: it would not load"
            rec.to(WorkerState.FAILED)
            rec.to(WorkerState.EXITED)

    def retire(self, rec: WorkerRecord) -> None:
        if rec.alive:
            rec.to(WorkerState.EXITED)

    def kill(self, rec: WorkerRecord, why: str, reason: str = "crashed") -> None:
        self.retire(rec)

    def release(self, rec: WorkerRecord) -> None:
        pass

    def activate(self, rt: ModelRuntime) -> None:
        self.activations.append(rt.serving_gen)

    def device_level(self, device: str) -> int | None:
        return None if device == "cpu" else self.gpu.memory(0)[0]  # type: ignore[index]

    def takes_standby(self, rt: ModelRuntime, device: str) -> bool:
        return False


def run(
    sup: FakeSupervisor,
    op: Operation,
    clock: FakeClock,
    step_s: float = 0.001,
    on_turn: Callable[[], None] = lambda: None,
) -> Any:
    """Poll the operation like poold's loop, one turn every ``step_s`` of fake time;
    ``on_turn`` plays what the workers do meanwhile."""
    results: list[Any] = []
    sup.time = clock  # the operation reads the same clock the scheduler runs on
    scheduler = Scheduler(clock=clock)
    scheduler.start("test", op, results.append)
    for _ in range(200_000):
        if results:
            return results[0]
        clock.now += step_s
        on_turn()
        scheduler.poll()
    raise AssertionError("the operation never finished")
