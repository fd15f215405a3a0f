"""The shell around the supervisor: events in, commands carried out.

``Shell.feed`` hands one event (``pool.events``) to ``Supervisor.handle`` and carries out
the commands it returns (``pool.commands``), in order, through the real things: the
router, the spawner, ``os.killpg``, the state store, the metrics, NVML, ``/proc``. A
command whose answer the supervisor needs (the spawner's token, an NVML reading, a pid
that may be gone) is answered with an event at once, before the next command runs.
Commands that an operation left (one a control command or a reload started) are taken
with ``flush``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from collections.abc import Iterable

import msgpack
import psutil

from pool.commands import (
    Activate,
    AddRoute,
    AddWorker,
    Command,
    Deactivate,
    FailQueued,
    ObserveBatch,
    ObserveExit,
    ObserveUpgrade,
    ProbePid,
    Record,
    Recycle,
    RemoveDir,
    RemoveRoute,
    RemoveWorker,
    SampleCpu,
    SampleMemory,
    SaveState,
    SendControl,
    Signal,
    Spawn,
)
from pool.events import CpuSample, Event, MemorySample, SpawnAsked, WorkerVanished
from pool.gpu import Gpu
from pool.liveness import cpu_seconds
from pool.metrics import PoolMetrics
from pool.operations import start_recycle
from pool.spawn import SpawnerClient
from pool.state import StateStore
from pool.supervisor import Supervisor
from router.router import Router

log = logging.getLogger("pool.supervisor")  # the lines the supervisor used to write


class Shell:
    def __init__(
        self,
        sup: Supervisor,
        router: Router,
        spawner: SpawnerClient,
        store: StateStore,
        gpu: Gpu,
        metrics: PoolMetrics,
    ) -> None:
        self.sup = sup
        self.router = router
        self.spawner = spawner
        self.store = store
        self.gpu = gpu
        self.metrics = metrics

    def feed(self, event: Event) -> None:
        self.carry_out(self.sup.handle(event))

    def flush(self) -> None:
        """Carry out what operations decided outside ``handle`` (control, reload)."""
        self.carry_out(self.sup.take_commands())

    def carry_out(self, commands: Iterable[Command]) -> None:
        todo = deque(commands)
        while todo:
            todo.extend(self.run(todo.popleft()))
            todo.extend(self.sup.take_commands())  # a recycle started, say

    def run(self, cmd: Command) -> list[Command]:
        """Carry out one command; the commands the supervisor decided on its answer."""
        sup, router = self.sup, self.router
        match cmd:
            case Spawn(wid, spec, standby):
                if standby is not None:
                    token = self.spawner.take(standby.pid, standby.token, dict(spec))
                else:
                    token = self.spawner.spawn(dict(spec))
                return sup.handle(SpawnAsked(wid, token, sup.now))
            case Signal(pid, sig, _):
                try:
                    os.killpg(pid, sig)  # the worker leads its own session and group
                except ProcessLookupError:
                    pass
                except PermissionError as exc:
                    log.error("cannot signal worker %s: %s", pid, exc)
            case SendControl(wid, message):
                router.send_control(wid, msgpack.packb(dict(message)))
            case AddRoute(route):
                router.add_route(route)
            case RemoveRoute(model):
                router.remove_route(model)
            case AddWorker(slot):
                router.add_worker(slot)
            case Activate(model, generation, slots):
                router.activate(model, generation, list(slots))
            case Deactivate(slot):
                router.deactivate(slot)
            case RemoveWorker(wid, lost):
                router.remove_worker(wid, lost=lost)
            case FailQueued(model, code, message, why):
                n = router.fail_queued(model, code, message)
                log.error(
                    "model %s marked failed (%d queued requests answered): %s",
                    model,
                    n,
                    why,
                    extra={"model": model},
                )
            case Record(state, deployed, action, outcome, generation):
                self.store.record(state, deployed, action, outcome, generation=generation)
            case SaveState(state):
                self.store.save(state)
            case RemoveDir(path):
                shutil.rmtree(path, ignore_errors=True)
            case ObserveExit(model, reason):
                self.metrics.observe_worker_exit(model, reason)
            case ObserveBatch(model, size, count):
                self.metrics.observe_batch(model, size, count)
            case ObserveUpgrade(model, kind, outcome, phases, freed):
                self.metrics.observe_upgrade(model, kind, outcome, phases, freed)
            case Recycle(model, wid, why):
                rt, rec = sup.models.get(model), sup.by_wid.get(wid)
                if rt is not None and rec is not None:
                    start_recycle(sup, rt, rec, why)
            case SampleMemory(devices):
                procs = {idx: self.gpu.process_bytes(idx) for idx in devices}
                return sup.handle(MemorySample(procs, sup.now))
            case ProbePid(wid, pid):
                if pid is None or not psutil.pid_exists(pid):
                    return sup.handle(WorkerVanished(wid, sup.now))
            case SampleCpu(wid, pid):
                return sup.handle(CpuSample(wid, cpu_seconds(pid), sup.now))
        return []
