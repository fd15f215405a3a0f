"""A model's lifecycle: one enum, one table of moves.

``ModelRuntime`` stores its status and moves it only through this table (an illegal
move raises ``IllegalTransition``): ``begin`` / ``end`` of an operation, ``fail`` /
``recover``, ``unload``, and ``settle`` (STARTING <-> SERVING as ready workers of the
serving generation come and go, which the supervisor calls after each event).
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
