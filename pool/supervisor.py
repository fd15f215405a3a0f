"""The supervisor: which workers exist, what state they are in, and what to do about it.

A decision core: ``handle`` takes one event (``pool.events``: a worker's message, an
exit, a spawn, a tick with the time, a memory sample, ...) and returns the commands it
decided (``pool.commands``: spawn, signal, route, record, ...), which the daemon carries
out. It replaces workers that crash or hang (with a restart-storm guard), retires
drained workers in stages, and recycles workers by policy; it reads no clock (the time
comes with each event) and holds no socket, spawner or signal of its own. Its hot
standbys (``pool.standby``) are built here, on the same clock, outbox and ports. Long
operations live in ``pool.upgrade``; what they decide lands in the same outbox.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Mapping
from itertools import count
from typing import Any

from pool.commands import (
    Activate,
    AddRoute,
    AddWorker,
    Command,
    Record,
    SampleMemory,
    Spawn,
)
from pool.config import Config, ModelConfig, effective_model_roots, sandbox_mode
from pool.contract import Contract, ContractError
from pool.events import (
    CpuSample,
    Event,
    KillAll,
    MemorySample,
    Poll,
    SpawnAsked,
    SpawnerMessage,
    SpawnFailed,
    StopAll,
    Tick,
    WorkerExited,
    WorkerMessage,
    WorkerOverdue,
    WorkerSpawned,
    WorkerUnreachable,
    WorkerVanished,
)
from pool.exits import WorkerExits
from pool.gpu import device_index
from pool.lifecycle import WorkerRecord, WorkerState
from pool.ports import Ports
from pool.runtime import ModelRuntime
from pool.standby import Standbys
from pool.standby_use import StandbyUse
from pool.state import Deployed, ModelState
from pool.stopping import WorkerStopping
from pool.tasks import Scheduler
from pool.worker_messages import WorkerMessages
from router.table import ModelRoute, WorkerSlot

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 2.0

class Supervisor(StandbyUse, WorkerMessages, WorkerExits, WorkerStopping):
    def __init__(
        self,
        config: Config,
        ports: Ports,
        backend: str,
        lane: str,
        lifeline_fd: int,
    ) -> None:
        self.config = config
        self.pool = config.pool
        # The store, device memory and queues are the operations' (pool.ports: pool.upgrade
        # commits a switch and proves memory back through them, an unload serves the
        # queue); the supervisor's own decisions leave commands instead, apart from the
        # device level each spawn notes (pool.device_memory) and the standbys' forks.
        self.ports = ports
        self.backend = backend
        self.lane = lane  # the router's lane socket, for the workers' spec ("" = none)
        self.lifeline_fd = lifeline_fd
        self.models: dict[str, ModelRuntime] = {}
        self.outbox: list[Command] = []
        self.now = 0.0  # the time of the event being handled: the only clock here
        self.by_wid: dict[bytes, WorkerRecord] = {}
        self.by_pid: dict[int, WorkerRecord] = {}
        self.by_token: dict[int, WorkerRecord] = {}
        # Workers that exited with a boot-failure code before their "failed" event (with
        # the reason) arrived: wid -> (record, wait status, when to stop waiting).
        self.awaiting_reason: dict[bytes, tuple[WorkerRecord, int, float]] = {}
        self.scheduler = Scheduler(clock=lambda: self.now)
        self.wids = count(1)
        self.last_sample = 0.0
        self.standbys = Standbys(ports.spawner, ports.files, lifeline_fd, self.clock, self.emit)
        self.standbys.preload_target = self.preload_target
        # Where models may be loaded from; shared with the control server (one list).
        # Workers are told them too: a manifest's golden file must lie inside.
        self.roots: list[str] = list(effective_model_roots(config))

    # ------------------------------------------------------------ the interface
    def clock(self) -> float:
        """The core's clock, for the operations: the time of the event being handled."""
        return self.now

    def handle(self, event: Event) -> list[Command]:
        """Decide what ``event`` means; the commands to carry out, in order."""
        self.now = event.now
        match event:
            case WorkerMessage(wid, message, _):
                self.on_worker_event(wid, message)
            case SpawnAsked(wid, token, _):
                rec = self.by_wid.get(wid)
                if rec is not None:
                    self.by_token[token] = rec
            case WorkerSpawned(token, pid, _):
                self.on_spawned(token, pid)
            case SpawnFailed(token, reason, _):
                self.on_spawn_failed(token, reason)
            case SpawnerMessage(message, _):
                self.on_spawner_message(message)
            case WorkerExited(pid, status, _):
                self.on_exited(pid, status)
            case WorkerVanished(wid, _):
                rec = self.by_wid.get(wid)
                if rec is not None:
                    self._exited(rec, None)
            case WorkerUnreachable(wid, _):
                self.on_worker_unreachable(wid)
            case WorkerOverdue(wid, _):
                self.on_worker_overdue(wid)
            case Tick(now):
                self.tick(now)
            case Poll(_):
                self.scheduler.poll()
            case MemorySample(processes, _):
                self.memory_sampled(processes)
            case CpuSample(wid, cpu_s, now):
                rec = self.by_wid.get(wid)
                if rec is not None and rec.alive:
                    rec.cpu_progress.observe(cpu_s, rec.last_heartbeat, now)
                    self.judge_silence(rec, now)
            case StopAll(_):
                self.stop_all()
                self.standbys.stop_all()
            case KillAll(_):
                self.kill_all()
        for rt in self.models.values():
            rt.settle()  # STARTING <-> SERVING as ready workers came or went
        return self.take_commands()

    def emit(self, command: Command) -> None:
        self.outbox.append(command)

    def take_commands(self) -> list[Command]:
        """What was decided since the last call: by ``handle``, or by an operation a
        control command started (the daemon takes these after each)."""
        out, self.outbox = self.outbox, []
        return out

    # ------------------------------------------------------------------ models
    def add_model(
        self, cfg: ModelConfig, devices: tuple[str, ...], deployed: Deployed, state: ModelState
    ) -> ModelRuntime:
        route = ModelRoute(cfg.name, cfg.max_queue, cfg.request_timeout_s, cfg.retry_on_worker_loss)
        self.emit(AddRoute(route))
        rt = ModelRuntime(cfg=cfg, route=route, state=state, devices=devices)
        if not rt.state.config_path:
            rt.state.config_path = cfg.path
        self.models[cfg.name] = rt
        gen = self.new_generation(rt, deployed)
        rt.serving_gen = gen  # requests queue until its workers are ready
        for slot in range(len(devices)):
            self.spawn(rt, gen, slot)
        return rt

    def new_generation(self, rt: ModelRuntime, deployed: Deployed) -> int:
        gen = next(rt.gen_counter)
        rt.gens[gen] = deployed
        known = rt.state.contracts.get(deployed.digest)
        if known is not None:
            try:  # learned by an earlier run: warm-up and checks have it at once
                rt.contracts[gen] = Contract.from_json(known)
            except ContractError as exc:
                log.warning("%s: recorded contract unreadable: %s", rt.name, exc)
        return gen

    # ---------------------------------------------------------------- spawning
    def spawn(
        self, rt: ModelRuntime, generation: int, slot: int, hold: bool = False
    ) -> WorkerRecord:
        """A worker of ``generation`` on ``slot``: the device's standby when there is one.
        ``hold``: it stages its weights on the host and waits for ``release``."""
        dep = rt.gens[generation]
        device = rt.devices[slot]
        wid = f"{rt.name}.g{generation}.s{slot}.w{next(self.wids)}"
        cfg = rt.cfg
        # Credit of two batches: the next batch is already waiting at the worker while
        # the current one runs, so the device does not idle between forwards.
        view = WorkerSlot(wid.encode(), rt.name, generation, dep.version, 2 * cfg.max_batch)
        rec = WorkerRecord(
            wid=wid,
            model=rt.name,
            generation=generation,
            slot=slot,
            device=device,
            version=dep.version,
            path=dep.path,
            slot_view=view,
            spawned_at=self.now,
        )
        if cfg.max_requests > 0:
            jitter = int(cfg.max_requests * cfg.max_requests_jitter)
            rec.recycle_after = cfg.max_requests + random.randint(0, max(0, jitter))
        # Read before the standby is taken, while it still counts as a bare context.
        rec.device_used_at_spawn = self.device_level(device)
        taken = (
            self.take_standby(rt, device, dep.version, dep.path)
            if self.takes_standby(rt, device)
            else None
        )
        rec.holding = hold
        rec.from_standby = taken is not None  # the spawner's "took" confirms it
        rt.workers.append(rec)
        self.by_wid[view.wid] = rec
        self.emit(AddWorker(view))
        spec = {
            "wid": wid,
            "backend": self.backend,
            "lane": self.lane,
            "model": rt.name,
            "path": dep.path,
            "version": dep.version,
            "device": device,
            "generation": generation,
            "max_batch": cfg.max_batch,
            "max_delay_ms": cfg.max_delay_ms,
            "heartbeat_interval_s": self.pool.heartbeat_interval_s,
            "model_roots": list(self.roots),
            "threads": cfg.threads,
            "lifeline_fd": self.lifeline_fd,
            "warmup_signatures": [sig.to_wire() for sig in rt.warmup_signatures()],
            "cuda_graphs": cfg.cuda_graphs,
            "hold_device": hold,
            "sandbox": self.sandbox_request(rt, rec),
            "spawned_at": rec.spawned_at,  # the worker's timings start here (to_main_s)
        }
        self.emit(Spawn(view.wid, spec, taken))  # the shell answers with SpawnAsked
        log.info(
            "spawning %s version %s on %s%s",
            wid,
            dep.version,
            device,
            f" in standby {taken.sid}" if taken else "",
            extra={"model": rt.name, "version": dep.version, "generation": generation},
        )
        return rec

    def sandbox_request(self, rt: ModelRuntime, rec: WorkerRecord) -> dict[str, Any]:
        """How the worker confines itself (workers.sandbox.confine): its mode, and a run
        directory of its own under poold's (removed when the worker exits). It reads
        the spec's ``model_roots``, every root, so a standby taken for any model can."""
        rundir = os.path.dirname(self.backend.removeprefix("ipc://"))
        rec.run_dir = os.path.join(rundir, "w", rec.wid)
        return {
            "mode": sandbox_mode(self.pool, rt.cfg),
            "run_dir": rec.run_dir,
        }

    def on_spawned(self, token: int, pid: int) -> None:
        if self.standbys.on_spawned(token, pid):
            return
        rec = self.by_token.pop(token, None)
        if rec is None:
            return
        self._know_pid(rec, pid)
        if rec.state is WorkerState.SPAWNING:
            rec.to(WorkerState.STARTING)
            rec.last_heartbeat = self.now
        if rec.stop_stage:  # stopped before it even had a pid
            self._signal(rec, signal.SIGKILL)

    def _know_pid(self, rec: WorkerRecord, pid: int) -> None:
        if rec.pid is None:
            rec.pid = pid
            self.by_pid[pid] = rec

    def on_spawn_failed(self, token: int, reason: str) -> None:
        if self.standbys.on_spawn_failed(token, reason):
            return
        rec = self.by_token.pop(token, None)
        if rec is not None:
            rec.failure = reason
            self._exited(rec, None)

    # ------------------------------------------------------- between operations
    def refill(self, rt: ModelRuntime) -> None:
        """Schedule a worker for every slot the serving generation has none on."""
        if rt.failed or rt.removing or rt.serving_gen not in rt.gens:
            return
        alive = {w.slot for w in rt.alive(rt.serving_gen)}
        pending = {slot for _, slot in rt.restarts}
        for slot in range(len(rt.devices)):
            if slot not in alive and slot not in pending:
                self._schedule_restart(rt, slot, "no worker on this slot after an operation")

    def prune_generations(self, rt: ModelRuntime) -> None:
        """Forget generations nothing runs any more (call only between operations)."""
        live = {w.generation for w in rt.workers if w.alive} | {rt.serving_gen}
        for gen in [g for g in rt.gens if g not in live]:
            rt.forget(gen)

    def activate(self, rt: ModelRuntime) -> None:
        """Route to every ready worker of the serving generation: one table assignment."""
        slots = [
            w.slot_view
            for w in rt.workers
            if w.generation == rt.serving_gen and w.state is WorkerState.READY
        ]
        self.emit(Activate(rt.name, rt.serving_gen, tuple(slots)))

    def _commit_start(self, rt: ModelRuntime) -> None:
        dep = rt.deployed
        if dep is not None and rt.state.current != dep:
            self.emit(Record(rt.state, dep, "start", "committed", rt.serving_gen))

    # ---------------------------------------------------------- router callbacks
    def on_worker_unreachable(self, wid: bytes) -> None:
        rec = self.by_wid.get(wid)
        if rec is not None and rec.alive and rec.state is not WorkerState.STOPPING:
            self.kill(rec, "unreachable on the backend socket")

    def on_worker_overdue(self, wid: bytes) -> None:
        rec = self.by_wid.get(wid)
        if rec is not None and rec.alive and rec.stop_stage == 0:
            why = f"hung: no answer {self.pool.request_grace_s:.1f}s past a deadline"
            self.kill(rec, why, "hung")

    # ------------------------------------------------------------ periodic work
    def tick(self, now: float) -> None:
        self.stop_awaiting_reasons(now)
        for rt in self.models.values():
            due = [r for r in rt.restarts if r[0] <= now]
            if due and rt.busy is None and rt.failed is None:
                rt.restarts = [r for r in rt.restarts if r[0] > now]
                for _, slot in due:
                    if not any(
                        w.slot == slot and w.generation == rt.serving_gen for w in rt.alive()
                    ):
                        self.spawn(rt, rt.serving_gen, slot)
            for rec in list(rt.workers):
                self._tick_worker(rt, rec, now)
        if now - self.last_sample >= SAMPLE_EVERY_S:
            self.last_sample = now
            self.sample_memory()
        # Recomputed every tick: load, unload, scale and reload change the devices.
        self.standbys.want(
            d for m in self.models.values() for d in m.devices if self.takes_standby(m, d)
        )
        self.standbys.tick(now, self.busy_devices())
        self.scheduler.poll()

    def sample_memory(self) -> None:
        """Ask for per-worker (and per-standby) GPU bytes from NVML (keyed by pid): once
        every few seconds, and when a worker becomes ready. The shell answers with
        ``MemorySample``."""
        indexes = {device_index(rec.device) for rec in self.by_pid.values()}
        known = {i for i in indexes if i is not None} | self.standbys.devices()
        devices = tuple(sorted(known))
        if devices:
            self.emit(SampleMemory(devices))

    def memory_sampled(self, processes: Mapping[int, Mapping[int, int] | None]) -> None:
        self.standbys.memory_sampled(processes)
        for rec in self.by_pid.values():
            idx = device_index(rec.device)
            procs = processes.get(idx) if idx is not None else None
            if procs is not None and rec.pid is not None:
                rec.gpu_bytes = procs.get(rec.pid)
                if rec.state is WorkerState.READY and rec.ready_gpu_bytes is None:
                    rec.ready_gpu_bytes = rec.gpu_bytes
