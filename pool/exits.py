"""Workers leaving without being asked: exits, their reasons, restarts, failed models.

A worker that exits unasked is taken out of routing (its requests retried or answered
``WORKER_LOST``), logged with how it ended, and replaced after a back-off
(``pool.flapping``); too many failures in a window mark the model failed, which answers
its queue and new requests ``MODEL_UNAVAILABLE`` until an upgrade or rollback clears it.
"""

from __future__ import annotations

import logging

from pool.commands import Command, FailQueued, ObserveExit, RemoveDir, RemoveWorker
from pool.lifecycle import WorkerRecord, WorkerState, describe_exit, exit_code
from pool.runtime import ModelRuntime
from workers.exitcodes import BOOT_FAILURES, REASONED_EXITS

log = logging.getLogger("pool.supervisor")

# How long a worker's exit waits for the reason it sent just before (see on_exited).
REASON_GRACE_S = 0.5


class WorkerExits:
    """The exits half of the supervisor (mixed into ``pool.supervisor.Supervisor``)."""

    now: float  # the time of the event being handled (pool.supervisor.Supervisor.handle)
    models: dict[str, ModelRuntime]
    by_wid: dict[bytes, WorkerRecord]
    by_pid: dict[int, WorkerRecord]
    # Workers that exited with a boot-failure code before their "failed" event (with
    # the reason) arrived: wid -> (record, wait status, when to stop waiting).
    awaiting_reason: dict[bytes, tuple[WorkerRecord, int, float]]

    def emit(self, command: Command) -> None:
        raise NotImplementedError

    def unroute(self, rec: WorkerRecord, lost: bool) -> int:
        """Take ``rec`` out of the router (once); the requests it held, which the router
        retries or answers WORKER_LOST."""
        if not rec.routed:
            return 0
        rec.routed = False
        held = rec.slot_view.load
        self.emit(RemoveWorker(rec.slot_view.wid, lost))
        return held

    def on_exited(self, pid: int, status: int) -> None:
        rec = self.by_pid.pop(pid, None)
        if rec is None:
            return
        if rec.failure is None and exit_code(status) in REASONED_EXITS:
            # The worker sent its reason ("load: ...") as an event before it exited, but
            # the event comes over the backend socket and the exit through the spawner's
            # pipe, and the exit can arrive first. Wait a moment for the reason.
            deadline = self.now + REASON_GRACE_S
            self.awaiting_reason[rec.slot_view.wid] = (rec, status, deadline)
            return
        self._exited(rec, status)

    def stop_awaiting_reasons(self, now: float) -> None:
        """Exits whose reason did not come in time: the exit status is all there is."""
        for wid, (_, _, deadline) in list(self.awaiting_reason.items()):
            if now >= deadline:
                self._reason_arrived(wid)

    def _reason_arrived(self, wid: bytes) -> None:
        waiting = self.awaiting_reason.pop(wid, None)
        if waiting is not None:
            self._exited(waiting[0], waiting[1])

    def _exited(self, rec: WorkerRecord, status: int | None) -> None:
        if not rec.alive:
            return
        # A worker that had not started serving failed to boot (FAILED: it said why).
        boot = rec.booting or rec.state is WorkerState.FAILED
        rec.exit_status = status
        how = describe_exit(status) if status is not None else (rec.failure or "no process")
        rt = self.models.get(rec.model)
        lost = self.unroute(rec, lost=not rec.expected_exit)
        self.by_wid.pop(rec.slot_view.wid, None)
        if rec.pid is not None:
            self.by_pid.pop(rec.pid, None)
        rec.to(WorkerState.EXITED)
        if rec.run_dir:
            self.emit(RemoveDir(rec.run_dir))
        if rt is None:
            return
        rt.workers = [w for w in rt.workers if w.alive]
        if rec.expected_exit:
            log.info(
                "worker %s [pid %s] retired: %s",
                rec.wid,
                rec.pid,
                how,
                extra={"model": rec.model, "version": rec.version, "worker_pid": rec.pid},
            )
            self.emit(ObserveExit(rec.model, rec.exit_reason or "retired"))
            return
        reason = rec.exit_reason or (
            "boot_failed" if boot or exit_code(status) in BOOT_FAILURES else "crashed"
        )
        # Say how the process ended, and what we had noticed first if that differs
        # (a SIGKILLed worker is often seen as unreachable before its exit is reaped).
        said = how if rec.failure in (None, how) else f"{how} (first seen: {rec.failure})"
        rec.failure = rec.failure or how
        rt.last_failure = rec.failure
        log.error(
            "worker %s [pid %s] of %s v%s %s: %s (%s in flight re-routed)",
            rec.wid,
            rec.pid,
            rec.model,
            rec.version,
            "failed to start" if boot else "died",
            said,
            lost,
            extra={"model": rec.model, "version": rec.version, "worker_pid": rec.pid},
        )
        self.emit(ObserveExit(rec.model, reason))
        if rt.busy is None and rec.generation == rt.serving_gen:
            self._schedule_restart(rt, rec.slot, rec.failure)

    def _schedule_restart(self, rt: ModelRuntime, slot: int, why: str) -> None:
        delay = rt.flap.failure(self.now)
        if delay is None:
            self.mark_failed(
                rt,
                f"gave up after {rt.flap.attempts} failures in "
                f"{rt.flap.window_s:.0f}s; last: {why}",
            )
            return
        rt.restarts.append((self.now + delay, slot))

    def mark_failed(self, rt: ModelRuntime, why: str) -> None:
        rt.fail(why)
        rt.route.unavailable = f"model {rt.name!r} is failed: {why}"
        # The shell answers the queue and logs "model marked failed" with the count.
        self.emit(FailQueued(rt.name, "MODEL_UNAVAILABLE", rt.route.unavailable, why))

    def clear_failed(self, rt: ModelRuntime) -> None:
        rt.recover()
        rt.route.unavailable = None
        rt.flap.reset()
        rt.restarts.clear()
