"""A worker that fails to boot sends its reason as an event, then exits; the two reach
poold by different ways (the backend socket, the spawner's pipe), so the supervisor
must keep the reason whichever comes first."""

from __future__ import annotations

from pathlib import Path

from corekit import Core, only

from pool.commands import Command, ObserveExit
from pool.events import Tick, WorkerExited
from pool.exits import REASON_GRACE_S
from pool.lifecycle import WorkerRecord, WorkerState
from workers.exitcodes import BOOT_FAILURES

LOAD_FAILED = min(BOOT_FAILURES)
EXIT_STATUS = LOAD_FAILED << 8  # what waitpid reports for exit(LOAD_FAILED)
PID = 4242


def loading(tmp_path: Path) -> tuple[Core, WorkerRecord]:
    """A worker loading its model while an upgrade runs (so an exit restarts nothing)."""
    core = Core(tmp_path)
    rec = core.newest()
    core.spawned(rec, PID)
    core.says(rec, t="hello", pid=PID)
    core.rt.busy = "upgrade"  # as start_operation marks it
    return core, rec


def exits(cmds: list[Command]) -> list[str]:
    return [c.reason for c in only(cmds, ObserveExit)]


def test_reason_after_the_exit_is_kept(tmp_path: Path) -> None:
    core, rec = loading(tmp_path)
    assert core.feed(WorkerExited(PID, EXIT_STATUS, core.now)) == []
    assert rec.alive and rec.state is WorkerState.LOADING  # waiting for the reason
    cmds = core.says(rec, t="failed", stage="load", reason="bad file")
    assert rec.state is WorkerState.EXITED
    assert rec.failure == "load: bad file"
    assert not core.sup.awaiting_reason and exits(cmds) == ["boot_failed"]


def test_reason_before_the_exit_is_kept(tmp_path: Path) -> None:
    core, rec = loading(tmp_path)
    core.says(rec, t="failed", stage="load", reason="bad file")
    assert rec.state is WorkerState.FAILED
    core.feed(WorkerExited(PID, EXIT_STATUS, core.now))
    assert rec.state is WorkerState.EXITED and rec.failure == "load: bad file"


def test_without_a_reason_the_exit_status_is_reported_after_the_grace(tmp_path: Path) -> None:
    core, rec = loading(tmp_path)
    core.feed(WorkerExited(PID, EXIT_STATUS, core.now))
    core.feed(Tick(core.now + REASON_GRACE_S / 2))
    assert rec.alive
    cmds = core.feed(Tick(core.now + REASON_GRACE_S))
    assert rec.state is WorkerState.EXITED and not core.sup.awaiting_reason
    assert rec.failure is not None and f"exit {LOAD_FAILED}" in rec.failure
    assert exits(cmds) == ["boot_failed"]


def test_other_exits_are_not_held_back(tmp_path: Path) -> None:
    core, rec = loading(tmp_path)
    core.feed(WorkerExited(PID, 9, core.now))  # killed by SIGKILL while loading
    assert rec.state is WorkerState.EXITED and not core.sup.awaiting_reason


def test_an_exit_we_caused_is_labelled_with_why(tmp_path: Path) -> None:
    for reason in ("hung", "abandoned", "recycled"):
        core, rec = loading(tmp_path / reason)
        core.says(rec, t="ready", timings={})
        rec.expected_exit = reason == "recycled"  # a recycle retires; the others are kills
        rec.exit_reason = reason
        cmds = core.feed(WorkerExited(PID, 9, core.now))  # killed by SIGKILL
        assert exits(cmds) == [reason]
        assert (core.rt.last_failure is not None) is (not rec.expected_exit)
