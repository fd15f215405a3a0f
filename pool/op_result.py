"""What an operation on a model hands back: typed records, turned into JSON at the edge.

Every operation started through ``pool.operations.start_operation`` (or the scheduler)
ends with one :class:`OpResult`: an ``UpgradeResult`` (upgrade, rollback, recycle,
reconfigure), a ``RescaleResult`` (scale), a :class:`LoadResult`, an
:class:`UnloadResult`, an :class:`OpFailed` (refused, or failed before any plan ran), or
an :class:`OpCrashed` (the operation raised). Callers read the fields; only the control
server and the history turn one into JSON (``to_json``), so the wire keeps its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class OpResult(Protocol):
    """The part every operation's result shares."""

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str: ...  # "" when ok: why it failed or was refused

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class OpFailed:
    """An operation that was refused or failed before its plan ran; nothing changed."""

    model: str
    reason: str
    outcome: str | None = "failed"  # refused | failed; None: the wire names none
    ok: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "model": self.model}
        if self.outcome is not None:
            out["outcome"] = self.outcome
        out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class OpCrashed:
    """An operation that raised (``pool.tasks.Scheduler``): poold's log has the trace."""

    error: str
    ok: bool = False

    @property
    def reason(self) -> str:
        return self.error

    def to_json(self) -> dict[str, Any]:
        return {"ok": False, "error": self.error}


@dataclass(frozen=True)
class LoadResult:
    """``pool-ctl load`` (and a reload adding a model) that started every worker."""

    model: str
    version: str | None
    devices: tuple[str, ...]
    pids_started: tuple[int | None, ...]
    elapsed_s: float
    ok: bool = True
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "model": self.model,
            "outcome": "loaded",
            "version": self.version,
            "devices": list(self.devices),
            "pids_started": list(self.pids_started),
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass(frozen=True)
class UnloadResult:
    """``pool-ctl unload`` (and a reload removing a model): drained, stopped, gone."""

    model: str
    pids_stopped: tuple[int | None, ...]
    unanswered: int  # queued requests answered MODEL_UNAVAILABLE at the end
    elapsed_s: float
    ok: bool = True
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "model": self.model,
            "outcome": "unloaded",
            "pids_stopped": list(self.pids_stopped),
            "unanswered": self.unanswered,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def result_message(result: OpResult, fallback: str = "") -> dict[str, Any]:
    """The control protocol's closing message for ``result`` (``pool.control``): the one
    place an operation's record becomes JSON for pool-ctl."""
    error = "" if result.ok else (result.reason or fallback)
    return {"type": "result", "ok": result.ok, "data": result.to_json(), "error": error}
