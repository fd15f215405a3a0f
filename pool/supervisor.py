"""The supervisor: which workers exist, what state they are in, and what to do about it.

A decision core: ``handle`` takes one event (``pool.events``: a worker's message, an
exit, a spawn, a tick with the time, a memory sample, ...) and returns the commands it
decided (``pool.commands``: spawn, signal, route, record, ...), which the daemon carries
out. It replaces workers that crash or hang (with a restart-storm guard), retires
drained workers in stages, and recycles workers by policy; it reads no clock (the time
comes with each event) and holds no socket, spawner or signal of its own. Long
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
    ObserveBatch,
    Record,
    Recycle,
    SampleMemory,
    SaveState,
    Spawn,
)
from pool.config import Config, ModelConfig, effective_model_roots, sandbox_mode
from pool.contract import MAX_EXAMPLES, Contract, ContractError, InputSignature
from pool.events import (
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
from pool.gpu import Gpu, device_index
from pool.lifecycle import WorkerRecord, WorkerState
from pool.metrics import PoolMetrics
from pool.runtime import ModelRuntime
from pool.standby import Standbys
from pool.standby_use import StandbyUse
from pool.state import Deployed, ModelState, StateStore
from pool.stopping import WorkerStopping
from pool.tasks import Scheduler
from router.table import ModelRoute, WorkerSlot

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 2.0
MAX_LOAD_STEPS = 64  # a worker reports at most ~34 (workers.load_progress)


def graphs_note(graphs: Any) -> str:
    """`` (CUDA graphs at batch sizes 1-64)`` for a ready event that reports some."""
    sizes = graphs.get("sizes") if isinstance(graphs, dict) else None
    if not isinstance(sizes, list) or not sizes:
        return ""
    return f" (CUDA graphs at batch sizes {min(sizes)}-{max(sizes)}, {len(sizes)} of them)"


def sandbox_note(report: dict[str, Any] | None) -> str:
    """The worker's sandbox in a few words (workers.sandbox.SandboxReport)."""
    if not report:
        return "no sandbox report"
    if not report.get("applied"):
        return f"not sandboxed ({report.get('reason') or 'off'})"
    fs = f"landlock abi {report.get('landlock_abi')}" if report.get("fs") else "files open"
    return f"sandboxed ({fs}, network {report.get('net')})"


class Supervisor(StandbyUse, WorkerExits, WorkerStopping):
    def __init__(
        self,
        config: Config,
        standbys: Standbys,
        store: StateStore,
        gpu: Gpu,
        metrics: PoolMetrics,
        backend: str,
        lane: str,
        lifeline_fd: int,
    ) -> None:
        self.config = config
        self.pool = config.pool
        # The store, NVML and metrics are the operations' (pool.upgrade commits a switch
        # and reads device levels through them); the supervisor's own decisions leave
        # commands instead.
        self.store = store
        self.gpu = gpu
        self.metrics = metrics
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
        self.standbys = standbys
        self.standbys.preload_target = self.preload_target
        # Where models may be loaded from; shared with the control server (one list).
        # Workers are told them too: a manifest's golden file must lie inside.
        self.roots: list[str] = list(effective_model_roots(config))

    # ------------------------------------------------------------ the interface
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
            case StopAll(_):
                self.stop_all()
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

    # ------------------------------------------------------------ worker events
    def on_worker_event(self, wid: bytes, event: Mapping[str, Any]) -> None:
        rec = self.by_wid.get(wid)
        if rec is None or not rec.alive:
            return
        now = self.now
        rec.last_heartbeat = now
        kind = event.get("t")
        if rec.state in (WorkerState.SPAWNING, WorkerState.STARTING):
            # The worker's first words can overtake the spawner's "spawned" message
            # (two different pipes), so its hello also tells us its pid.
            pid = event.get("pid")
            if isinstance(pid, int) and pid > 0:
                self._know_pid(rec, pid)
            rec.to(WorkerState.STARTING)
            rec.to(WorkerState.LOADING)
        if kind == "hello":
            pass
        elif kind == "phase":
            phase = event.get("phase")
            done, total = event.get("bytes"), event.get("total")
            if phase == "loading" and isinstance(done, int) and isinstance(total, int):
                rec.load_total = max(0, total)
                steps = rec.load_steps
                if len(steps) >= MAX_LOAD_STEPS:  # bounded whatever a worker sends
                    steps.pop()
                steps.append(max(0, done))
            if phase == "warming" and rec.state is WorkerState.LOADING:
                rec.to(WorkerState.WARMING)
            elif phase == "validating" and rec.state is WorkerState.WARMING:
                rec.to(WorkerState.VALIDATING)
            elif phase == "staged" and rec.state is WorkerState.LOADING:
                rec.staged = True
        elif kind == "ready":
            self._ready(rec, event, now)
        elif kind == "hb":
            rec.rss = int(event.get("rss") or 0)
            batches = event.get("batches")
            for pair in batches[:1024] if isinstance(batches, list) else ():
                if isinstance(pair, list) and len(pair) == 2:
                    size, n = pair
                    if isinstance(size, int) and isinstance(n, int) and size > 0 and n > 0:
                        self.emit(ObserveBatch(rec.model, size, n))
            self._observed(rec, event.get("signatures"))
            answered, errors = event.get("served"), event.get("model_errors")
            if isinstance(answered, int) and isinstance(errors, int):
                rec.answered, rec.model_errors = answered, errors
            self._check_recycle(rec)
        elif kind == "contract":
            self._contract(rec, event.get("contract"))
        elif kind == "failed":
            rec.failure = f"{event.get('stage')}: {str(event.get('reason'))[:2000]}"
            trace = event.get("traceback")
            if isinstance(trace, str) and trace:
                log.error(
                    "worker %s [pid %s] internal error: %s\n%s",
                    rec.wid,
                    rec.pid,
                    event.get("reason"),
                    trace.rstrip()[-8000:],
                    extra={"model": rec.model, "version": rec.version, "worker_pid": rec.pid},
                )
            if rec.booting:
                rec.to(WorkerState.FAILED)
            self._reason_arrived(wid)

    def _observed(self, rec: WorkerRecord, value: Any) -> None:
        """Input signatures a worker served (heartbeat), typed: see ``pool.contract``."""
        rt = self.models.get(rec.model)
        if not isinstance(value, list) or not value or rt is None:
            return
        if rec.generation != rt.serving_gen:
            return  # a draining or new generation's traffic is not the serving contract
        try:
            rt.signatures = [InputSignature.from_wire(v) for v in value[:MAX_EXAMPLES]]
        except ContractError as exc:
            log.warning("worker %s sent a bad signature: %s", rec.wid, exc)

    def _contract(self, rec: WorkerRecord, value: Any) -> None:
        """A worker's contract (ready or learned from traffic): its generation's, and in
        the state per digest, so a restart warms up from it before anything is served."""
        rt = self.models.get(rec.model)
        if value is None or rt is None:
            return
        try:
            contract = Contract.from_json(value)
        except ContractError as exc:
            log.warning("worker %s sent a bad contract: %s", rec.wid, exc)
            return
        if rec.generation not in rt.gens:
            return
        rt.contracts[rec.generation] = contract  # what it probed beats what was recorded
        digest = rt.gens[rec.generation].digest
        recorded = contract.to_json()
        if rt.state.contracts.get(digest) != recorded:
            rt.state.contracts[digest] = recorded
            self.emit(SaveState(rt.state))

    def _ready(self, rec: WorkerRecord, event: Mapping[str, Any], now: float) -> None:
        if rec.state is WorkerState.READY or not rec.can(WorkerState.READY):
            return  # a repeated "ready", or one from a worker already being stopped
        rec.to(WorkerState.READY)
        rec.ready_at = now
        timings = event.get("timings")
        rec.timings = {k: float(v) for k, v in timings.items()} if isinstance(timings, dict) else {}
        rec.timings["spawn_to_ready_s"] = now - rec.spawned_at
        sent = event.get("sent_at")
        if isinstance(sent, float) and sent <= now:
            rec.timings["ready_delivery_s"] = now - sent
        rec.rss = int(event.get("rss") or 0)
        frozen = event.get("heap_frozen")
        rec.heap_frozen = frozen if isinstance(frozen, int) else 0
        sandbox = event.get("sandbox")
        rec.sandbox = sandbox if isinstance(sandbox, dict) else None
        self.sample_memory()  # its footprint now, for auto's next decision
        self.standbys.sample()
        rt = self.models.get(rec.model)
        if rt is None:
            return
        self._contract(rec, event.get("contract"))
        rt.note_schema(rec.generation, event.get("schema"))
        extra = {"model": rec.model, "version": rec.version, "worker_pid": rec.pid}
        graphs = event.get("graphs")
        log.info(
            "worker %s ready [pid %s] in %.2fs%s; %s",
            rec.wid,
            rec.pid,
            now - rec.spawned_at,
            graphs_note(graphs),
            sandbox_note(rec.sandbox),
            extra=extra,
        )
        skipped = graphs.get("skipped") if isinstance(graphs, dict) else None
        for reason in skipped[:8] if isinstance(skipped, list) else ():
            log.warning("worker %s: no CUDA graphs for %s", rec.wid, reason, extra=extra)
        if rec.generation == rt.serving_gen:
            # Also while an operation runs: a first start or a crash replacement of the
            # serving generation belongs in the table, and in the history.
            self.activate(rt)
            if rt.failed is None:
                rt.flap.reset()
            self._commit_start(rt)

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
            self.standbys.sample()
        # Recomputed every tick: load, unload, scale and reload change the devices.
        self.standbys.want(
            d for m in self.models.values() for d in m.devices if self.takes_standby(m, d)
        )
        self.standbys.tick(now, self.busy_devices())
        self.scheduler.poll()

    def _check_recycle(self, rec: WorkerRecord) -> None:
        # A worker can outlive its model's entry (unloaded, removed by a reload): the
        # heartbeat of such a draining worker is no reason to recycle, or to raise.
        rt = self.models.get(rec.model)
        if rt is None or rec.state is not WorkerState.READY or rt.busy is not None or rt.failed:
            return
        cfg = rt.cfg
        why = None
        if rec.recycle_after and rec.slot_view.served >= rec.recycle_after:
            why = f"served {rec.slot_view.served} requests (max_requests)"
        elif cfg.max_rss_mb and rec.rss > cfg.max_rss_mb << 20:
            why = f"RSS {rec.rss >> 20} MiB over max_rss_mb"
        elif (
            cfg.max_gpu_growth_mb
            and rec.gpu_bytes is not None
            and rec.ready_gpu_bytes
            and rec.gpu_bytes - rec.ready_gpu_bytes > cfg.max_gpu_growth_mb << 20
        ):
            why = f"GPU memory grew {(rec.gpu_bytes - rec.ready_gpu_bytes) >> 20} MiB"
        if why is not None:
            self.emit(Recycle(rt.name, rec.slot_view.wid, why))

    def sample_memory(self) -> None:
        """Ask for per-worker GPU bytes from NVML (keyed by pid): once every few seconds,
        and when a worker becomes ready. The shell answers with ``MemorySample``."""
        indexes = {device_index(rec.device) for rec in self.by_pid.values()}
        devices = tuple(sorted(i for i in indexes if i is not None))
        if devices:
            self.emit(SampleMemory(devices))

    def memory_sampled(self, processes: Mapping[int, Mapping[int, int] | None]) -> None:
        for rec in self.by_pid.values():
            idx = device_index(rec.device)
            procs = processes.get(idx) if idx is not None else None
            if procs is not None and rec.pid is not None:
                rec.gpu_bytes = procs.get(rec.pid)
                if rec.state is WorkerState.READY and rec.ready_gpu_bytes is None:
                    rec.ready_gpu_bytes = rec.gpu_bytes
