"""The serving loop's parts: a request waiting for its batch, a gather (the batch being
collected), a launched batch, and the thread that wakes the loop when the device is done.
``workers.serve`` puts them together."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from queue import SimpleQueue
from typing import Any

import torch

from workers.batching import GroupResult
from workers.codec import RequestLayout
from workers.copier import Copier
from workers.staging import Staged, Stager, TensorSpec


class Pending:
    """A request waiting for its batch: its header's layout, its staged inputs (arena
    offsets or tensors, see ``workers.staging``) and when the worker took it (monotonic
    seconds: its in-worker wait, reported in the reply, starts there)."""

    __slots__ = ("key", "layout", "staged", "taken")

    def __init__(
        self, key: bytes, layout: RequestLayout, staged: list[Staged], taken: float = 0.0
    ) -> None:
        self.key = key
        self.layout = layout
        self.staged = staged
        self.taken = taken


def inputs_of(
    members: Sequence[Pending],
    build: Callable[[list[Staged], list[TensorSpec]], torch.Tensor],
) -> list[torch.Tensor]:
    """The batch of each input of ``members``, made by ``build`` from the members' staged
    parts (a stager's ``batch``, on the device, or ``host_batch``)."""
    specs = [r.layout.specs for r in members]
    return [
        build([r.staged[i] for r in members], [s[i] for s in specs]) for i in range(len(specs[0]))
    ]


class Gather:
    """Requests taken for the next launch, and the arena they are staged in.

    The worker has three and takes turns with them (see ``Worker.serve``): one runs on
    the device, one may be queued behind it, one takes requests. A gather is reset
    only after its previous batch was answered, so its arena is free again by then.
    """

    __slots__ = ("requests", "rows", "since", "stager")

    def __init__(self, device: torch.device, copier: Copier | None = None) -> None:
        self.stager = Stager(device, copier=copier)
        self.requests: list[Pending] = []
        self.rows = 0
        self.since = 0.0  # when the first request was taken

    def reset(self) -> None:
        self.requests = []
        self.rows = 0
        self.stager.reset()


class Launched:
    """A gather whose forwards were queued on the device; answerable once ``event`` (None
    on a CPU: the forward already ran) has completed."""

    __slots__ = ("at", "event", "groups", "host_s", "queued", "rows", "start")

    def __init__(
        self,
        groups: list[tuple[list[Pending], GroupResult]],
        event: Any,
        rows: int = 0,
        start: Any = None,
    ) -> None:
        self.groups = groups
        self.event = event
        # For the pacing clock (workers.pacing): its size, when it was launched, whether
        # behind a running batch, and a timing event recorded as its work began.
        self.rows = rows
        self.at = 0.0
        self.queued = False
        self.start = start
        self.host_s = 0.0  # the launch's own time, which is its compute on a CPU

    def compute_s(self) -> float:
        """The batch's compute: on a GPU the device's time between the events recorded
        before and after its work (read once it completed), else the launch's time."""
        if self.event is None or self.start is None:
            return self.host_s
        try:
            return float(self.start.elapsed_time(self.event)) / 1000.0
        except RuntimeError:  # an event not recorded with timing: the host's view
            return self.host_s

    def done(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Completions:
    """Wakes the serving loop (a readable eventfd) when a launched batch's CUDA event
    completes, so that the loop can block in one poll on both its socket and the GPU.

    A thread waits on the events (``synchronize`` releases the GIL; the events are
    created with ``blocking=True`` so it sleeps rather than spins). The loop itself still
    checks ``Launched.done`` first, so a late wake-up costs one spare poll, not latency.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.queue: SimpleQueue[Any] = SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="completions", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (event := self.queue.get()) is not None:
            try:
                event.synchronize()
            except Exception:
                pass  # a device error: the serving loop meets it when it queries the event
            try:
                os.eventfd_write(self.fd, 1)
            except OSError:
                return  # closed: the loop has ended

    def watch(self, event: Any) -> None:
        self.queue.put(event)

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(1.0)
        if not self.thread.is_alive():  # else it may still write: leave the fd to the exit
            os.close(self.fd)
