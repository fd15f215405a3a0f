"""Taking workers out of service: drain, stop, kill, and the stages between.

Stopping is staged the way gunicorn and circus do it: a polite ``stop`` control
message, then SIGTERM to the worker's process group, then SIGKILL. A worker judged
broken (hung, unreachable, past its boot deadline) skips the polite stage and gets
SIGABRT first, so its faulthandler writes every thread's stack to the log.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from pool.commands import Command, Deactivate, ProbePid, SampleCpu, SendControl, Signal
from pool.lifecycle import WorkerRecord, WorkerState
from pool.runtime import ModelRuntime

if TYPE_CHECKING:
    from pool.config import PoolConfig

log = logging.getLogger("pool.supervisor")

KILL_GRACE_S = 2.0  # SIGTERM/SIGABRT -> SIGKILL


class WorkerStopping:
    """The stopping half of the supervisor (mixed into ``pool.supervisor.Supervisor``)."""

    pool: PoolConfig
    now: float  # the time of the event being handled (pool.supervisor.Supervisor.handle)
    models: dict[str, ModelRuntime]

    def _exited(self, rec: WorkerRecord, status: int | None) -> None:
        raise NotImplementedError

    def emit(self, command: Command) -> None:
        raise NotImplementedError

    def unroute(self, rec: WorkerRecord, lost: bool) -> int:
        raise NotImplementedError

    def retire(self, rec: WorkerRecord) -> None:
        """Take a worker out of routing; it is stopped once it holds nothing."""
        if rec.state in (WorkerState.READY,):
            self.emit(Deactivate(rec.slot_view))
            rec.to(WorkerState.DRAINING)
            rec.stop_deadline = self.now + self.pool.drain_timeout_s
            rec.expected_exit = True
        elif rec.alive and rec.state is not WorkerState.DRAINING:
            self.stop(rec)

    def stop(self, rec: WorkerRecord) -> None:
        """Polite stop, escalating in tick(): control message, SIGTERM, SIGKILL (group)."""
        if not rec.alive or rec.stop_stage:
            return
        rec.expected_exit = True
        self.emit(Deactivate(rec.slot_view))
        rec.to(WorkerState.STOPPING)
        rec.stop_stage = 1
        rec.stop_deadline = self.now + self.pool.stop_timeout_s
        self.emit(SendControl(rec.slot_view.wid, {"t": "stop"}))

    def kill(self, rec: WorkerRecord, why: str, reason: str = "crashed") -> None:
        """A worker that is broken: signal its process group now, re-route its requests.

        ``reason`` labels its exit in gpupool_worker_exits_total (hung, abandoned, ...)."""
        rec.exit_reason = rec.exit_reason or reason
        log.warning(
            "killing worker %s [pid %s]: %s",
            rec.wid,
            rec.pid,
            why,
            extra={"model": rec.model, "version": rec.version, "worker_pid": rec.pid},
        )
        rec.failure = rec.failure or why
        self.unroute(rec, lost=True)
        if rec.state is not WorkerState.STOPPING:
            rec.to(WorkerState.STOPPING)
        rec.stop_stage = 2
        rec.stop_deadline = self.now + KILL_GRACE_S
        # SIGABRT: the worker's faulthandler writes every thread's stack to the log first,
        # which is what an operator needs to see of a hung model. SIGKILL follows.
        self._signal(rec, signal.SIGABRT)

    def _signal(self, rec: WorkerRecord, sig: int) -> None:
        if rec.pid is not None:  # the worker leads its own session and group: killpg
            self.emit(Signal(rec.pid, sig, rec.stop_stage))

    def _tick_worker(self, rt: ModelRuntime, rec: WorkerRecord, now: float) -> None:
        state = rec.state
        if state is WorkerState.DRAINING:
            if not rec.slot_view.load or now >= rec.stop_deadline:
                self.stop(rec)
        elif state is WorkerState.STOPPING and now >= rec.stop_deadline:
            if rec.stop_stage == 1:
                rec.stop_stage = 2
                rec.stop_deadline = now + KILL_GRACE_S
                self._signal(rec, signal.SIGTERM)
            elif rec.stop_stage == 2:
                rec.stop_stage = 3
                rec.stop_deadline = now + KILL_GRACE_S
                self._signal(rec, signal.SIGKILL)
            elif rec.pid is None:
                self._exited(rec, None)  # never spawned
            else:  # reaped without our hearing of it? The shell answers WorkerVanished
                self.emit(ProbePid(rec.slot_view.wid, rec.pid))
        elif rec.booting:
            if now - rec.spawned_at > self.pool.boot_timeout_s:
                rec.failure = f"not ready after {self.pool.boot_timeout_s:.0f}s (boot_timeout_s)"
                self.kill(rec, rec.failure, "boot_failed")
        elif state is WorkerState.READY:
            silent = now - rec.last_heartbeat
            if silent <= min(2 * self.pool.heartbeat_interval_s, self.pool.heartbeat_timeout_s):
                return  # a beat or two late: nothing to sample yet
            # Silent: busy in a long forward, or hung? Its CPU time tells (pool.liveness);
            # the shell reads it and answers with CpuSample, which judges at once.
            if rec.cpu_progress.due(rec.last_heartbeat, now):
                self.emit(SampleCpu(rec.slot_view.wid, rec.pid))
            else:
                self.judge_silence(rec, now)

    def judge_silence(self, rec: WorkerRecord, now: float) -> None:
        """A silent ready worker that used no CPU for heartbeat_timeout_s is hung."""
        if rec.state is not WorkerState.READY or rec.stop_stage:
            return
        alive_at = rec.cpu_progress.alive_at(rec.last_heartbeat)
        if now - alive_at > self.pool.heartbeat_timeout_s:
            self.kill(
                rec,
                f"hung: no heartbeat for {now - rec.last_heartbeat:.1f}s, and no CPU time "
                f"used for {now - alive_at:.1f}s",
                "hung",
            )

    def stop_all(self) -> None:
        for rt in self.models.values():
            for rec in rt.alive():
                if rec.state is WorkerState.READY:
                    self.retire(rec)
                else:
                    self.stop(rec)

    def all_exited(self) -> bool:
        return not any(rt.alive() for rt in self.models.values())

    def kill_all(self) -> None:
        for rt in self.models.values():
            for rec in rt.alive():
                self._signal(rec, signal.SIGKILL)
