"""A worker that fails to boot sends its reason as an event, then exits; the two reach
poold by different ways (the backend socket, the spawner's pipe), so the supervisor
must keep the reason whichever comes first."""

from __future__ import annotations

from types import SimpleNamespace

from pool.exits import REASON_GRACE_S
from pool.lifecycle import WorkerRecord, WorkerState
from pool.supervisor import Supervisor
from router.table import WorkerSlot
from workers.exitcodes import BOOT_FAILURES

LOAD_FAILED = min(BOOT_FAILURES)
EXIT_STATUS = LOAD_FAILED << 8  # what waitpid reports for exit(LOAD_FAILED)


class _Router:
    def remove_worker(self, wid: bytes, lost: bool) -> int:
        return 0


class _Standbys:
    def on_exited(self, pid: int, status: int) -> bool:
        return False  # no standby has this pid: the exit is a worker's


class _Metrics:
    def __init__(self) -> None:
        self.exits: list[str] = []

    def observe_worker_exit(self, model: str, reason: str) -> None:
        self.exits.append(reason)


def _supervisor() -> tuple[Supervisor, WorkerRecord]:
    sup = Supervisor.__new__(Supervisor)  # only the exit and event paths are exercised
    rec = WorkerRecord(
        wid="m.g2.s0.w1",
        model="m",
        generation=2,
        slot=0,
        device="cpu",
        version="2",
        path="/nowhere",
        slot_view=WorkerSlot(b"m.g2.s0.w1", "m", 2, "2", 1),
        state=WorkerState.LOADING,
        pid=4242,
    )
    # An upgrade is running (busy), so an exit schedules no restart.
    rt = SimpleNamespace(name="m", workers=[rec], busy="2", serving_gen=1, last_failure=None)
    sup.models = {"m": rt}  # type: ignore[dict-item]
    sup.by_wid = {rec.slot_view.wid: rec}
    sup.by_pid = {4242: rec}
    sup.awaiting_reason = {}
    sup.router = _Router()  # type: ignore[assignment]
    sup.metrics = _Metrics()  # type: ignore[assignment]
    sup.standbys = _Standbys()  # type: ignore[assignment]
    return sup, rec


def test_reason_after_the_exit_is_kept() -> None:
    sup, rec = _supervisor()
    sup.on_exited(4242, EXIT_STATUS)
    assert rec.alive and rec.state is WorkerState.LOADING  # waiting for the reason
    sup.on_worker_event(rec.slot_view.wid, {"t": "failed", "stage": "load", "reason": "bad file"})
    assert rec.state is WorkerState.EXITED
    assert rec.failure == "load: bad file"
    assert not sup.awaiting_reason and sup.metrics.exits == ["boot_failed"]  # type: ignore[attr-defined]


def test_reason_before_the_exit_is_kept() -> None:
    sup, rec = _supervisor()
    sup.on_worker_event(rec.slot_view.wid, {"t": "failed", "stage": "load", "reason": "bad file"})
    assert rec.state is WorkerState.FAILED
    sup.on_exited(4242, EXIT_STATUS)
    assert rec.state is WorkerState.EXITED and rec.failure == "load: bad file"


def test_without_a_reason_the_exit_status_is_reported_after_the_grace() -> None:
    sup, rec = _supervisor()
    sup.on_exited(4242, EXIT_STATUS)
    (_, _, deadline) = sup.awaiting_reason[rec.slot_view.wid]
    sup.stop_awaiting_reasons(deadline - REASON_GRACE_S / 2)
    assert rec.alive
    sup.stop_awaiting_reasons(deadline)
    assert rec.state is WorkerState.EXITED and not sup.awaiting_reason
    assert rec.failure is not None and f"exit {LOAD_FAILED}" in rec.failure


def test_other_exits_are_not_held_back() -> None:
    sup, rec = _supervisor()
    sup.on_exited(4242, 9)  # killed by SIGKILL while loading
    assert rec.state is WorkerState.EXITED and not sup.awaiting_reason


def test_an_exit_we_caused_is_labelled_with_why() -> None:
    for reason in ("hung", "abandoned", "recycled"):
        sup, rec = _supervisor()
        rec.state = WorkerState.READY
        rec.expected_exit = reason == "recycled"  # a recycle retires; the others are kills
        rec.exit_reason = reason
        sup.on_exited(4242, 9)  # killed by SIGKILL
        assert sup.metrics.exits == [reason]  # type: ignore[attr-defined]
        assert (sup.models["m"].last_failure is not None) is (not rec.expected_exit)
