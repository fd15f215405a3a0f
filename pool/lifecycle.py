"""Worker lifecycle: states, the legal transitions between them, and the typed record."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pool.liveness import CpuProgress
from router.table import WorkerSlot


class WorkerState(StrEnum):
    SPAWNING = "spawning"  # asked the spawner for a process
    STARTING = "starting"  # has a pid, not yet heard from
    LOADING = "loading"
    WARMING = "warming"
    VALIDATING = "validating"
    READY = "ready"  # loaded and warm; may be in the routing table
    DRAINING = "draining"  # gets nothing new, finishing what it holds
    STOPPING = "stopping"  # told to exit; escalating to signals if it does not
    FAILED = "failed"  # could not become ready; waiting for its exit
    EXITED = "exited"  # reaped


_BOOTING = {"starting", "loading", "warming", "validating"}
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.SPAWNING: frozenset(
        {WorkerState.STARTING, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    WorkerState.STARTING: frozenset(
        {WorkerState.LOADING, WorkerState.FAILED, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    # READY straight from LOADING: a worker's "ready" says it loaded and warmed up, and
    # it is the truth even when its "phase: warming" event never reached us.
    WorkerState.LOADING: frozenset(
        {
            WorkerState.WARMING,
            WorkerState.READY,
            WorkerState.FAILED,
            WorkerState.STOPPING,
            WorkerState.EXITED,
        }
    ),
    WorkerState.WARMING: frozenset(
        {
            WorkerState.VALIDATING,
            WorkerState.READY,
            WorkerState.FAILED,
            WorkerState.STOPPING,
            WorkerState.EXITED,
        }
    ),
    WorkerState.VALIDATING: frozenset(
        {WorkerState.READY, WorkerState.FAILED, WorkerState.STOPPING, WorkerState.EXITED}
    ),
    WorkerState.READY: frozenset({WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.STOPPING: frozenset({WorkerState.EXITED}),
    WorkerState.FAILED: frozenset({WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class WorkerRecord:
    wid: str
    model: str
    generation: int
    slot: int
    device: str
    version: str
    path: str
    slot_view: WorkerSlot
    state: WorkerState = WorkerState.SPAWNING
    pid: int | None = None
    spawned_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    cpu_progress: CpuProgress = field(default_factory=CpuProgress)  # while it is silent
    timings: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    exit_status: int | None = None
    expected_exit: bool = False  # we asked it to go: an exit is a retirement, not a crash
    # The worker_exits_total reason when we ended it: recycled, hung, abandoned, ...
    exit_reason: str | None = None
    rss: int = 0
    answered: int = 0  # replies the worker sent, errors included (from its heartbeat)
    model_errors: int = 0  # of them MODEL_ERROR (the watch window compares versions)
    heap_frozen: int = 0  # objects the worker keeps out of garbage collection
    malformed: int = 0  # messages it sent that did not decode (pool.worker_wire): ignored
    gpu_bytes: int | None = None
    ready_gpu_bytes: int | None = None
    device_used_at_spawn: int | None = None
    stop_stage: int = 0
    stop_deadline: float = 0.0
    routed: bool = True  # in the router's table: until the supervisor's RemoveWorker
    recycle_after: int = 0
    shapes: list[Any] = field(default_factory=list)
    from_standby: bool = False  # started in a hot standby (pool.standby), not a fresh fork
    holding: bool = False  # staging its weights on the host until released (drain-first)
    staged: bool = False  # said its weights are staged
    run_dir: str = ""  # its own writable directory (workers.sandbox), removed at its exit
    sandbox: dict[str, Any] | None = None  # what its sandbox applied (SandboxReport)
    # Bytes of the model file loaded, each step the worker reported (workers.load_progress):
    # several can arrive in one loop turn, and each is forwarded to pool-ctl.
    load_steps: list[int] = field(default_factory=list)
    load_total: int = 0

    def can(self, new: WorkerState) -> bool:
        """Whether the table allows going to ``new`` now (staying counts as allowed)."""
        return new is self.state or new in TRANSITIONS[self.state]

    def to(self, new: WorkerState) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"worker {self.wid}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def booting(self) -> bool:
        return self.state.value in _BOOTING or self.state is WorkerState.SPAWNING

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.EXITED

    def describe(self) -> dict[str, Any]:
        return {
            "wid": self.wid,
            "pid": self.pid,
            "device": self.device,
            "state": self.state.value,
            "version": self.version,
            "generation": self.generation,
            "inflight": self.slot_view.load,
            "served": self.slot_view.served,
            "lane": self.slot_view.lane,
            "gpu_bytes": self.gpu_bytes,
            "rss_bytes": self.rss,
            "heap_frozen": self.heap_frozen,
            "uptime_s": round(time.monotonic() - self.ready_at, 1) if self.ready_at else 0.0,
            "failure": self.failure,
            "from_standby": self.from_standby,
            # Its model came from the standby's preload (pool.preload): no read at start.
            "preloaded": bool(self.timings.get("preloaded")),
            "sandbox": self.sandbox,
        }


def exit_code(status: int | None) -> int | None:
    """The exit code in a waitpid status; None for a signal (or no status)."""
    return os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None


def describe_exit(status: int) -> str:
    """A waitpid status in words: 'exit 64 (load failed)' or 'killed by SIGKILL'."""
    import signal

    from workers.exitcodes import EXIT_MEANING  # no torch: a constants-only module

    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
    meaning = EXIT_MEANING.get(code)
    return f"exit {code}" + (f" ({meaning})" if meaning else "")
