"""What the shell tells the supervisor: typed events, each carrying the time it happened.

The daemon (``pool.daemon``) turns sockets, pipes, signals, NVML and the spawner into
these records and hands each to ``Supervisor.handle``, which answers with commands
(``pool.commands``). The supervisor reads no clock: ``now`` comes in with every event,
so a test drives it with a fake one (``tests/test_supervisor_unit.py``).

Control commands (pool-ctl) and config diffs (reload) do not come here one by one: they
start operations (``pool.control``, ``pool.manage``, ``pool.reload``), which call the
supervisor's decisions and leave their commands in the same outbox.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pool.worker_wire import WorkerEvent


@dataclass(frozen=True)
class WorkerMessage:
    """A worker said something on the backend socket (hello, phase, ready, hb, ...),
    decoded by the shell into its record (``pool.worker_wire.decode``)."""

    wid: bytes
    message: WorkerEvent
    now: float


@dataclass(frozen=True)
class SpawnAsked:
    """The spawner took a ``Spawn`` command; its answers will name ``token``."""

    wid: bytes
    token: int
    now: float


@dataclass(frozen=True)
class WorkerSpawned:
    token: int
    pid: int
    now: float


@dataclass(frozen=True)
class SpawnFailed:
    token: int
    reason: str
    now: float


@dataclass(frozen=True)
class SpawnerMessage:
    """The spawner's news about standbys and takes ("standby_ready", "took")."""

    message: dict[str, Any]
    now: float


@dataclass(frozen=True)
class WorkerExited:
    """A reaped process: the spawner's reaper or poold's own (orphans)."""

    pid: int
    status: int
    now: float


@dataclass(frozen=True)
class WorkerVanished:
    """A ``ProbePid`` found no such process: reaped without our hearing of it."""

    wid: bytes
    now: float


@dataclass(frozen=True)
class WorkerUnreachable:
    """The router could not send to the worker (its socket is gone)."""

    wid: bytes
    now: float


@dataclass(frozen=True)
class WorkerOverdue:
    """A request of this worker is past its deadline plus the grace."""

    wid: bytes
    now: float


@dataclass(frozen=True)
class Tick:
    """The periodic turn: deadlines, stop stages, restarts, memory samples, standbys."""

    now: float


@dataclass(frozen=True)
class Poll:
    """Between ticks: resume the operations whose wait is over."""

    now: float


@dataclass(frozen=True)
class MemorySample:
    """NVML's per-process device memory, per device index (None: unreadable), as a
    ``SampleMemory`` command asked for it."""

    processes: Mapping[int, Mapping[int, int] | None]
    now: float


@dataclass(frozen=True)
class CpuSample:
    """A silent worker's CPU seconds (None: gone), as a ``SampleCpu`` command asked."""

    wid: bytes
    cpu_s: float | None
    now: float


@dataclass(frozen=True)
class StopAll:
    """poold is stopping: retire what serves, stop the rest."""

    now: float


@dataclass(frozen=True)
class KillAll:
    """poold stops now: SIGKILL every worker left."""

    now: float


Event = (
    WorkerMessage
    | SpawnAsked
    | WorkerSpawned
    | SpawnFailed
    | SpawnerMessage
    | WorkerExited
    | WorkerVanished
    | WorkerUnreachable
    | WorkerOverdue
    | Tick
    | Poll
    | MemorySample
    | CpuSample
    | StopAll
    | KillAll
)
