"""A model's lifecycle as the supervisor reports it: one enum, one table of moves.

``ModelRuntime.status()`` derives the status from what the supervisor holds (the
unloading mark, the failed reason, the running operation, ready workers of the
serving generation); the table says which changes between two readings are legal, and
the supervisor's unit tests check every one they see against it.
"""

from __future__ import annotations

from enum import StrEnum


class ModelStatus(StrEnum):
    STARTING = "starting"  # no ready worker of the serving generation (yet, or again)
    SERVING = "serving"
    UPGRADING = "upgrading"  # an operation runs (upgrade, rollback, recycle, scale)
    FAILED = "failed"  # restarts gave up; requests are answered MODEL_UNAVAILABLE
    UNLOADING = "unloading"  # retiring: drained, then forgotten (pool.manage)


M = ModelStatus
TRANSITIONS: dict[ModelStatus, frozenset[ModelStatus]] = {
    M.STARTING: frozenset({M.SERVING, M.UPGRADING, M.FAILED, M.UNLOADING}),
    M.SERVING: frozenset({M.STARTING, M.UPGRADING, M.FAILED, M.UNLOADING}),
    M.UPGRADING: frozenset({M.SERVING, M.STARTING, M.FAILED, M.UNLOADING}),
    # an operator's upgrade or rollback is how a failed model recovers
    M.FAILED: frozenset({M.UPGRADING, M.UNLOADING}),
    M.UNLOADING: frozenset(),
}
