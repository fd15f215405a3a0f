"""What the supervisor tells the shell to do: typed commands, carried out in order.

``Supervisor.handle`` (and every decision an operation calls) leaves these in the
supervisor's outbox; the daemon takes them (``Supervisor.take_commands``) and carries
each out: the spawner, ``os.killpg``, the router, the state store, the metrics. The
supervisor (its standbys too, ``pool.standby``) touches none of them. A command whose
outcome the supervisor needs (the spawner's token, an NVML reading, whether a pid still
exists) is answered by the shell with an event (``pool.events``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pool.state import Deployed, ModelState
from router.table import ModelRoute, WorkerSlot


@dataclass(frozen=True)
class AddRoute:
    route: ModelRoute


@dataclass(frozen=True)
class RemoveRoute:
    """The model is gone (unloaded): its route goes, after what was decided before."""

    model: str


@dataclass(frozen=True)
class AddWorker:
    """Give the router the worker's row (before it can say hello)."""

    slot: WorkerSlot


@dataclass(frozen=True)
class Taken:
    """A hot standby handed to a worker's ``Spawn`` (``pool.standby.Standbys.take``):
    its pid, or the token of its fork when the spawner has not said the pid yet."""

    pid: int | None
    token: int
    sid: str
    waited: bool  # True: it had finished preparing (WAITING): the take saves its set-up
    preloaded: bool = False  # its preload is loaded and is the version taken


@dataclass(frozen=True)
class Spawn:
    """Fork a worker through the spawner (into ``standby`` when one was taken); the shell
    answers with ``SpawnAsked`` (the spawner's token)."""

    wid: bytes
    spec: Mapping[str, Any]  # the spawner's wire spec (workers.spawner)
    standby: Taken | None


@dataclass(frozen=True)
class Signal:
    """``os.killpg(pid, signal)``: the worker leads its own group. ``stage``: the stop
    stage the worker is at (2: SIGTERM or SIGABRT, 3: SIGKILL; lower under ``KillAll``;
    0 for a standby let go)."""

    pid: int
    signal: int
    stage: int


@dataclass(frozen=True)
class SendControl:
    """A control message to one worker on the backend socket (stop, go)."""

    wid: bytes
    message: Mapping[str, Any]


@dataclass(frozen=True)
class Activate:
    """Route ``model``'s new requests to exactly ``slots`` (one table assignment)."""

    model: str
    generation: int
    slots: tuple[WorkerSlot, ...]


@dataclass(frozen=True)
class Deactivate:
    slot: WorkerSlot


@dataclass(frozen=True)
class RemoveWorker:
    """Forget a worker in the router; ``lost``: its requests are retried or answered
    WORKER_LOST as lost, not as stopped."""

    wid: bytes
    lost: bool


@dataclass(frozen=True)
class FailQueued:
    """Answer every queued request of a failed model; the shell logs how many, with
    ``why`` (the model's failure)."""

    model: str
    code: str
    message: str
    why: str


@dataclass(frozen=True)
class Record:
    """A history entry (``StateStore.record``)."""

    state: ModelState
    deployed: Deployed
    action: str
    outcome: str
    generation: int


@dataclass(frozen=True)
class SaveState:
    state: ModelState


@dataclass(frozen=True)
class RemoveDir:
    """A worker's run directory, once it exited."""

    path: str


@dataclass(frozen=True)
class ObserveExit:
    model: str
    reason: str


@dataclass(frozen=True)
class ObserveBatch:
    model: str
    size: int
    count: int


@dataclass(frozen=True)
class ObserveUpgrade:
    """A finished upgrade / rollback / recycle and its phase timings (the metrics)."""

    model: str
    kind: str
    outcome: str
    phases: Mapping[str, float]
    bytes_freed: int


@dataclass(frozen=True)
class Recycle:
    """Start the recycle operation for one worker (``pool.operations.start_recycle``)."""

    model: str
    wid: bytes
    why: str


@dataclass(frozen=True)
class SampleMemory:
    """Read NVML's per-process memory on these device indexes; answered with
    ``MemorySample``."""

    devices: tuple[int, ...]


@dataclass(frozen=True)
class ProbePid:
    """Does ``pid`` still exist? If not, the shell answers ``WorkerVanished``."""

    wid: bytes
    pid: int | None


@dataclass(frozen=True)
class SampleCpu:
    """Read a silent worker's CPU seconds from /proc; answered with ``CpuSample``."""

    wid: bytes
    pid: int | None


Command = (
    AddRoute
    | RemoveRoute
    | AddWorker
    | Spawn
    | Signal
    | SendControl
    | Activate
    | Deactivate
    | RemoveWorker
    | FailQueued
    | Record
    | SaveState
    | RemoveDir
    | ObserveExit
    | ObserveBatch
    | ObserveUpgrade
    | Recycle
    | SampleMemory
    | ProbePid
    | SampleCpu
)
