"""What the core reaches outside through: five narrow typed interfaces.

An upgrade must commit the new version to disk before it switches (a restart comes back
on what clients were served), proves a retired worker's memory back from NVML (a spawn
notes its device's level for that proof), an unload serves its model's queue before the
workers go, and a standby fork needs the spawner's token at once (a take may name the
fork before the spawner has said its pid), and a standby's preload is decided from the
model file's size and the host's available memory (and a deploy's file is hashed off
the loop). Those answers are needed inside a step, so
they are calls, not commands; but each is a ``Protocol`` of the methods used, so a test
hands the real core, its standbys and its operations a fake store, fake device memory,
fake queues, a fake spawner and a fake host (``tests/corekit.py``). The daemon passes
the real things: ``pool.state.StateStore``, ``pool.gpu.Gpu``, ``router.router.Router``,
``pool.spawn.SpawnerClient``, ``pool.host_files.LocalFiles``.

The clock is not here: the core, its standbys and its operations read the core's,
``Supervisor.now``, the time of the event being handled. What needs no answer (a
signal, a directory to remove, a metric) is a command (``pool.commands``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from concurrent.futures import Future

    from pool.state import Deployed, ModelState


class VersionStore(Protocol):
    """The state directory: the current version and the history of each model."""

    def commit_current(self, state: ModelState, deployed: Deployed) -> None:
        """Write ``deployed`` as current; raise OSError (``state`` as it was) if not."""

    def record(
        self, state: ModelState, deployed: Deployed, action: str, outcome: str, **extra: Any
    ) -> object:
        """Append one history entry (and save)."""

    def save(self, state: ModelState) -> None:
        """Write ``state``; a failure is kept and retried, not raised."""

    def problem(self) -> str:
        """"" when every model's state is on disk, else what is not."""


class DeviceMemory(Protocol):
    """NVML's view of a device, by index; None when NVML or the device is absent."""

    def memory(self, index: int) -> tuple[int, int, int] | None:
        """(used, free, total) bytes."""

    def process_bytes(self, index: int) -> dict[int, int] | None:
        """Bytes of each process with a context on the device, by pid."""


class Queues(Protocol):
    """The router's per-model queues of requests waiting for a worker."""

    def queue_len(self, model: str) -> int:
        """Requests of ``model`` waiting now."""

    def fail_queued(self, model: str, code: str, message: str) -> int:
        """Answer every waiting request of ``model`` with ``code``; how many."""


class Spawner(Protocol):
    """The spawner, for what must be asked of it outside a worker's ``Spawn``."""

    def standby(self, spec: dict[str, Any]) -> int:
        """Fork a standby for ``spec["device"]`` (``workers.standby``); the token that
        its answers (``WorkerSpawned``, ``SpawnFailed``) will name."""


class HostFiles(Protocol):
    """The host's files: what a standby's preload decides (``pool.preload``) and the
    digest an operation records (``pool.operations.digest_then``)."""

    def size(self, path: str) -> int:
        """The file's size in bytes; raise OSError if it cannot be read."""

    def mem_available(self) -> int | None:
        """The host's available memory in bytes (MemAvailable); None if unknown."""

    def realpath(self, path: str) -> str:
        """``path`` with every symbolic link resolved."""

    def digest(self, path: str, done: list[int]) -> Future[str]:
        """The file's ``sha256:`` digest, computed off the caller's thread; ``done[0]``
        counts the bytes hashed so far (for progress)."""


@dataclass(frozen=True)
class Ports:
    """The five interfaces, as the supervisor keeps them for itself, its standbys and
    the operations."""

    store: VersionStore
    memory: DeviceMemory
    queues: Queues
    spawner: Spawner
    files: HostFiles
