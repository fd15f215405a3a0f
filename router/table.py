"""The routing table: model -> serving generation -> workers that may take requests.

These records live on the router's hot path, so they use ``__slots__`` and plain
containers. The supervisor (``pool/``) decides which workers are dispatchable; the router
only reads that decision and keeps the per-request bookkeeping.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class Request:
    """One client request, from arrival on the frontend until its reply leaves."""

    __slots__ = (
        "key",
        "envelope",
        "frames",
        "model",
        "client_id",
        "arrived",
        "deadline",
        "dispatched",
        "attempts",
        "worker",
        "answered",
    )

    def __init__(
        self,
        key: bytes,
        envelope: list[Any],
        frames: list[Any],
        model: str,
        client_id: Any,
        arrived: float,
        deadline: float,
    ) -> None:
        self.key = key
        self.envelope = envelope  # identity frame(s) plus the empty delimiter
        self.frames = frames  # header frame followed by tensor frames, forwarded untouched
        self.model = model
        self.client_id = client_id
        self.arrived = arrived
        self.deadline = deadline
        self.dispatched = 0.0
        self.attempts = 0
        self.worker: WorkerSlot | None = None
        # Answered DEADLINE_EXCEEDED while a worker still holds it: the worker's late
        # reply is dropped, and the worker counts as hung if it never sends one.
        self.answered = False


class WorkerSlot:
    """The router's view of one worker process."""

    __slots__ = ("wid", "model", "generation", "version", "credit", "inflight", "served")

    def __init__(self, wid: bytes, model: str, generation: int, version: str, credit: int) -> None:
        self.wid = wid
        self.model = model
        self.generation = generation
        self.version = version
        self.credit = max(1, credit)  # how many requests this worker may hold at once
        self.inflight: dict[bytes, Request] = {}
        self.served = 0


class ModelRoute:
    """Where requests for one model go, and where they wait."""

    __slots__ = (
        "name",
        "generation",
        "active",
        "queue",
        "max_queue",
        "timeout_s",
        "retry",
        "unavailable",
    )

    def __init__(self, name: str, max_queue: int, timeout_s: float, retry: bool) -> None:
        self.name = name
        self.generation = 0  # the serving generation; 0 until the first one is ready
        # Workers that receive new requests. The supervisor replaces this list in one
        # assignment when it switches generations, so no dispatch sees a mixture.
        self.active: list[WorkerSlot] = []
        self.queue: deque[Request] = deque()
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry = retry
        # A reason to answer MODEL_UNAVAILABLE at once instead of queueing (failed model).
        self.unavailable: str | None = None
