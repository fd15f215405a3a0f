"""What workers say on the backend socket, decided (mixed into ``pool.supervisor.Supervisor``).

hello / phase (loading bytes, warming, validating, staged) / ready / hb (RSS, batch
sizes, input signatures, answers) / contract / failed: each moves the worker through
its table (``pool.lifecycle``), keeps what it reported, and leaves commands (route the
ready, record a first start, save a learned contract, recycle past a limit).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pool.commands import Command, ObserveBatch, Recycle, SaveState
from pool.contract import MAX_EXAMPLES, Contract, ContractError, InputSignature
from pool.lifecycle import WorkerRecord, WorkerState
from pool.runtime import ModelRuntime

if TYPE_CHECKING:
    from pool.standby import Standbys

log = logging.getLogger("pool.supervisor")

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
        rt = self.models.get(rec.model)
        if rt is None:
            self._sample_after_ready()
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
        self._sample_after_ready()

    def _sample_after_ready(self) -> None:
        # Its footprint now, for auto's next decision; after the route, because NVML's
        # per-process query takes milliseconds that a crash replacement's first request
        # would otherwise wait.
        self.sample_memory()
        self.standbys.sample()

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
