"""What workers say on the backend socket, decided (mixed into ``pool.supervisor.Supervisor``).

Each message comes decoded, one record per kind (``pool.worker_wire``): hello / phase
(loading bytes, warming, validating, staged) / ready / hb (RSS, batch sizes, input
signatures, answers) / contract / failed / bye. Each moves the worker through its table
(``pool.lifecycle``), keeps what it reported, and leaves commands (route the ready,
record a first start, save a learned contract, recycle past a limit). A ``Malformed``
one changes nothing: it is logged, and the worker's record stays as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pool.commands import Command, ObserveBatch, Recycle, SaveState
from pool.contract import Contract, InputSignature
from pool.lifecycle import WorkerRecord, WorkerState
from pool.runtime import ModelRuntime
from pool.worker_wire import (
    Bye,
    ContractReport,
    Failed,
    Graphs,
    Heartbeat,
    Hello,
    Malformed,
    Phase,
    PhaseName,
    Ready,
    WorkerEvent,
)

if TYPE_CHECKING:
    from pool.standby import Standbys

log = logging.getLogger("pool.supervisor")

MAX_LOAD_STEPS = 64  # a worker reports at most ~34 (workers.load_progress)
MALFORMED_LOGGED = 3  # per worker: the first few in full, then every 100th


def graphs_note(graphs: Graphs | None) -> str:
    """`` (CUDA graphs at batch sizes 1-64)`` for a ready event that reports some."""
    if graphs is None or not graphs.sizes:
        return ""
    sizes = graphs.sizes
    return f" (CUDA graphs at batch sizes {min(sizes)}-{max(sizes)}, {len(sizes)} of them)"


def sandbox_note(report: Mapping[str, Any] | None) -> str:
    """The worker's sandbox in a few words (workers.sandbox.SandboxReport)."""
    if not report:
        return "no sandbox report"
    if not report.get("applied"):
        return f"not sandboxed ({report.get('reason') or 'off'})"
    fs = f"landlock abi {report.get('landlock_abi')}" if report.get("fs") else "files open"
    return f"sandboxed ({fs}, network {report.get('net')})"


class WorkerMessages:
    models: dict[str, ModelRuntime]
    by_wid: dict[bytes, WorkerRecord]
    standbys: Standbys
    now: float

    if TYPE_CHECKING:  # the supervisor's own, declared for the type checker only

        def emit(self, command: Command) -> None: ...
        def _know_pid(self, rec: WorkerRecord, pid: int) -> None: ...
        def _reason_arrived(self, wid: bytes) -> None: ...
        def sample_memory(self) -> None: ...
        def activate(self, rt: ModelRuntime) -> None: ...
        def _commit_start(self, rt: ModelRuntime) -> None: ...

    def on_worker_event(self, wid: bytes, event: WorkerEvent) -> None:
        rec = self.by_wid.get(wid)
        if rec is None or not rec.alive:
            return
        if isinstance(event, Malformed):
            self._malformed(rec, event)
            return
        now = self.now
        rec.last_heartbeat = now
        if rec.state in (WorkerState.SPAWNING, WorkerState.STARTING):
            # The worker's first words can overtake the spawner's "spawned" message
            # (two different pipes), so its hello also tells us its pid.
            if event.pid is not None:
                self._know_pid(rec, event.pid)
            rec.to(WorkerState.STARTING)
            rec.to(WorkerState.LOADING)
        match event:
            case Hello():
                pass
            case Phase():
                self._phase(rec, event)
            case Ready():
                self._ready(rec, event, now)
            case Heartbeat():
                self._heartbeat(rec, event)
            case ContractReport(_, contract, problem):
                self._contract(rec, contract, problem)
            case Failed(_, stage, reason, trace):
                self._failed(wid, rec, stage, reason, trace)
            case Bye():
                pass

    def _malformed(self, rec: WorkerRecord, event: Malformed) -> None:
        """Nothing in it is believed; said in the log, boundedly (a worker runs model
        code, which could write anything to its socket)."""
        rec.malformed += 1
        if rec.malformed <= MALFORMED_LOGGED or rec.malformed % 100 == 0:
            log.error(
                "worker %s [pid %s] sent a malformed %s message (%d so far): %s; ignored",
                rec.wid,
                rec.pid,
                event.kind or "untyped",
                rec.malformed,
                event.problem,
                extra={"model": rec.model, "version": rec.version, "worker_pid": rec.pid},
            )

    def _phase(self, rec: WorkerRecord, event: Phase) -> None:
        phase = event.phase
        if phase is PhaseName.LOADING and event.done is not None and event.total is not None:
            rec.load_total = event.total
            steps = rec.load_steps
            if len(steps) >= MAX_LOAD_STEPS:  # bounded whatever a worker sends
                steps.pop()
            steps.append(event.done)
        if phase is PhaseName.WARMING and rec.state is WorkerState.LOADING:
            rec.to(WorkerState.WARMING)
        elif phase is PhaseName.VALIDATING and rec.state is WorkerState.WARMING:
            rec.to(WorkerState.VALIDATING)
        elif phase is PhaseName.STAGED and rec.state is WorkerState.LOADING:
            rec.staged = True

    def _heartbeat(self, rec: WorkerRecord, event: Heartbeat) -> None:
        rec.rss = event.rss
        for size, n in event.batches:
            self.emit(ObserveBatch(rec.model, size, n))
        if event.signatures_problem:
            log.warning("worker %s sent a bad signature: %s", rec.wid, event.signatures_problem)
        self._observed(rec, event.signatures)
        if event.served is not None and event.model_errors is not None:
            rec.answered, rec.model_errors = event.served, event.model_errors
        self._check_recycle(rec)

    def _failed(self, wid: bytes, rec: WorkerRecord, stage: str, reason: str, trace: str) -> None:
        rec.failure = f"{stage}: {reason}"
        if trace:
            log.error(
                "worker %s [pid %s] internal error: %s\n%s",
                rec.wid,
                rec.pid,
                reason,
                trace.rstrip(),
                extra={"model": rec.model, "version": rec.version, "worker_pid": rec.pid},
            )
        if rec.booting:
            rec.to(WorkerState.FAILED)
        self._reason_arrived(wid)

    def _observed(self, rec: WorkerRecord, value: tuple[InputSignature, ...] | None) -> None:
        """Input signatures a worker served (heartbeat), typed: see ``pool.contract``."""
        rt = self.models.get(rec.model)
        if not value or rt is None:
            return
        if rec.generation != rt.serving_gen:
            return  # a draining or new generation's traffic is not the serving contract
        rt.signatures = list(value)

    def _contract(self, rec: WorkerRecord, contract: Contract | None, problem: str) -> None:
        """A worker's contract (ready or learned from traffic): its generation's, and in
        the state per digest, so a restart warms up from it before anything is served."""
        if problem:
            log.warning("worker %s sent a bad contract: %s", rec.wid, problem)
        rt = self.models.get(rec.model)
        if contract is None or rt is None:
            return
        if rec.generation not in rt.gens:
            return
        rt.contracts[rec.generation] = contract  # what it probed beats what was recorded
        digest = rt.gens[rec.generation].digest
        recorded = contract.to_json()
        if rt.state.contracts.get(digest) != recorded:
            rt.state.contracts[digest] = recorded
            self.emit(SaveState(rt.state))

    def _ready(self, rec: WorkerRecord, event: Ready, now: float) -> None:
        if rec.state is WorkerState.READY or not rec.can(WorkerState.READY):
            return  # a repeated "ready", or one from a worker already being stopped
        rec.to(WorkerState.READY)
        rec.ready_at = now
        rec.timings = dict(event.timings)
        rec.timings["spawn_to_ready_s"] = now - rec.spawned_at
        if event.sent_at is not None and event.sent_at <= now:
            rec.timings["ready_delivery_s"] = now - event.sent_at
        rec.rss = event.rss
        rec.heap_frozen = event.heap_frozen
        rec.sandbox = dict(event.sandbox) if event.sandbox is not None else None
        self.sample_memory()  # its footprint now (and the standbys'), for auto's next decision
        rt = self.models.get(rec.model)
        if rt is None:
            return
        self._contract(rec, event.contract, event.contract_problem)
        rt.note_schema(rec.generation, event.schema)
        extra = {"model": rec.model, "version": rec.version, "worker_pid": rec.pid}
        log.info(
            "worker %s ready [pid %s] in %.2fs%s; %s",
            rec.wid,
            rec.pid,
            now - rec.spawned_at,
            graphs_note(event.graphs),
            sandbox_note(rec.sandbox),
            extra=extra,
        )
        for reason in event.graphs.skipped if event.graphs is not None else ():
            log.warning("worker %s: no CUDA graphs for %s", rec.wid, reason, extra=extra)
        if rec.generation == rt.serving_gen:
            # Also while an operation runs: a first start or a crash replacement of the
            # serving generation belongs in the table, and in the history.
            self.activate(rt)
            if rt.failed is None:
                rt.flap.reset()
            self._commit_start(rt)

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
