"""The routing table: model -> serving generation -> workers that may take requests.

These records live on the router's hot path, so they use ``__slots__`` and plain
containers. The supervisor (``pool/``) decides which workers are dispatchable; the router
only reads that decision and keeps the per-request bookkeeping.
"""

from __future__ import annotations

from typing import Any


class WorkerSlot:
    """The router's view of one worker process."""

    __slots__ = ("wid", "model", "generation", "version", "credit", "index", "core", "final_served")

    def __init__(self, wid: bytes, model: str, generation: int, version: str, credit: int) -> None:
        self.wid = wid
        self.model = model
        self.generation = generation
        self.version = version
        self.credit = max(1, credit)  # how many requests this worker may hold at once
        self.index = -1  # its row in the C core, once the router has added it
        self.core: Any = None
        self.final_served = 0  # what it had served when the router let it go

    @property
    def load(self) -> int:
        """Requests this worker holds now."""
        return self.core.worker_load(self.index) if self.core is not None else 0

    @property
    def served(self) -> int:
        """Replies this worker has sent."""
        return self.core.worker_served(self.index) if self.core is not None else self.final_served

    @property
    def lane(self) -> bool:
        """Whether the worker's lane is connected (``workers.lane``)."""
        return self.core.worker_has_lane(self.index) if self.core is not None else False


class ModelRoute:
    """Where requests for one model go, and where they wait."""

    __slots__ = (
        "name",
        "generation",
        "active",
        "max_queue",
        "timeout_s",
        "retry",
        "unavailable",
        "index",
        "pushed",
    )

    def __init__(self, name: str, max_queue: int, timeout_s: float, retry: bool) -> None:
        self.name = name
        self.generation = 0  # the serving generation; 0 until the first one is ready
        # Workers that receive new requests. The supervisor replaces this list in one
        # assignment when it switches generations, so no dispatch sees a mixture.
        self.active: list[WorkerSlot] = []
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry = retry
        # A reason to answer MODEL_UNAVAILABLE at once instead of queueing (failed model).
        self.unavailable: str | None = None
        self.index = -1  # its row in the C core
        self.pushed: tuple[Any, ...] = ()  # what the C core was last told about this route
