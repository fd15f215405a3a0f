"""An upgrade's phases (pool.upgrade_phases): the table, and the path each plan takes,
driven in-process with a fake supervisor and a fake clock (tests/upgradekit.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from upgradekit import FakeClock, FakeSupervisor, run

from pool.lifecycle import IllegalTransition, WorkerRecord, WorkerState
from pool.state import Deployed
from pool.upgrade import Upgrade
from pool.upgrade_phases import TRANSITIONS, PhaseTrack, UpgradePhase
from pool.upgrade_result import Restore, UpgradeResult

P = UpgradePhase
V2 = Deployed("2", "/models/m/2.pt", "d2")


def upgrade(sup: FakeSupervisor, strategy: str) -> Upgrade:
    return Upgrade(sup, sup.rt, V2, strategy, 60.0, "upgrade", lambda *a, **k: None)  # type: ignore[arg-type]


def reachable(start: UpgradePhase) -> set[UpgradePhase]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_phase_is_reachable_and_every_path_can_end() -> None:
    assert reachable(P.PLANNING) == set(P)
    terminal = {p for p in P if p.terminal}
    assert terminal == {P.COMMITTED, P.ROLLED_BACK, P.RESTORE_FAILED}
    for phase in P:
        assert reachable(phase) & terminal, phase


def test_an_illegal_move_raises_and_each_phase_is_timed() -> None:
    clock = FakeClock()
    track = PhaseTrack(clock)
    clock.now += 1.0
    track.enter(P.STARTING)
    clock.now += 2.5
    track.enter(P.STARTING)  # staying is no move
    track.enter(P.RETIRING)
    with pytest.raises(IllegalTransition, match="retiring -> starting"):
        track.enter(P.STARTING)
    with pytest.raises(IllegalTransition):
        PhaseTrack(clock, P.COMMITTED).enter(P.ROLLED_BACK)  # terminal
    assert track.seconds == {P.PLANNING: 1.0, P.STARTING: 2.5}
    assert track.path == [P.PLANNING, P.STARTING, P.RETIRING]


def path_of(
    devices: tuple[str, ...], strategy: str, fate: Callable[[WorkerRecord], bool]
) -> tuple[list[str], tuple[UpgradeResult, FakeSupervisor]]:
    sup = FakeSupervisor(devices, fate)
    result = run(sup, upgrade(sup, strategy).run(), FakeClock())
    return [p.value for p in result.path], (result, sup)


def test_surge_plan() -> None:
    path, _ = path_of(("cpu", "cpu"), "surge", lambda rec: True)
    assert path == ["planning", "starting", "retiring", "committed"]
    path, _ = path_of(("cpu", "cpu"), "surge", lambda rec: rec.slot == 0)
    assert path == ["planning", "starting", "abandoning", "rolled_back"]


def test_drain_first_across_two_devices() -> None:
    path, (result, sup) = path_of(("cuda:0", "cuda:1"), "drain-first", lambda rec: True)
    assert path == ["planning", "draining", "starting", "draining", "starting", "committed"]
    assert result.ok and result.to_version == "2"
    workers = sup.rt.workers
    # One slot at a time: each old worker is gone before its slot's new one exists, and
    # the table switched to the new generation once, at the first new worker.
    order = [(w.generation, w.slot) for w in workers]
    assert order == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [w.state for w in workers] == [WorkerState.EXITED] * 2 + [WorkerState.READY] * 2
    assert sup.activations == [2, 2]


def test_failed_drain_first_plans_restore() -> None:
    fails_on_slot_1 = lambda rec: rec.slot == 0 or rec.generation == 1  # noqa: E731
    path, (result, _) = path_of(("cpu", "cpu"), "drain-first", fails_on_slot_1)
    tail = ["abandoning", "rolling_back", "rolled_back"]
    assert path == ["planning", "draining", "starting", "draining", "starting", *tail]
    never_again = lambda rec: rec.slot == 0 and rec.generation == 2  # noqa: E731
    path, (result, _) = path_of(("cpu", "cpu"), "drain-first", never_again)
    assert path[-3:] == ["abandoning", "rolling_back", "restore_failed"]
    assert result.outcome is P.RESTORE_FAILED


def watched(devices: tuple[str, ...], strategy: str, failing: bool) -> list[str]:
    """An upgrade with a watch window: each loop turn, every routed worker of the new
    version answers one request, a MODEL_ERROR when ``failing``."""
    sup = FakeSupervisor(devices, lambda rec: True)
    sup.pool = dataclasses.replace(sup.pool, watch_requests=10, watch_s=5.0)

    def serve() -> None:
        if sup.activations and sup.activations[-1] == 2:
            for w in sup.rt.alive(2):
                w.answered += 1
                w.model_errors += failing

    result = run(sup, upgrade(sup, strategy).run(), FakeClock(), on_turn=serve)
    assert result.ok is not failing, result
    return [p.value for p in result.path]


def test_the_watch_window_is_a_phase_of_both_plans() -> None:
    assert watched(("cpu",), "surge", False) == [
        "planning",
        "starting",
        "watching",
        "retiring",
        "committed",
    ]
    # failed: the old generation never stopped; the new one is retired
    assert watched(("cpu",), "surge", True)[-3:] == ["watching", "retiring", "rolled_back"]
    two = ("cpu", "cpu")
    ok = ["planning", "draining", "starting", "watching", "draining", "starting", "committed"]
    assert watched(two, "drain-first", False) == ok
    tail = ["watching", "abandoning", "rolling_back", "rolled_back"]
    assert watched(two, "drain-first", True)[-4:] == tail


def test_the_result_is_a_typed_record_of_pids_phases_and_restore() -> None:
    sup = FakeSupervisor(("cpu", "cpu"), lambda rec: True)
    old = [w.pid for w in sup.rt.workers]
    up = upgrade(sup, "drain-first")
    clock = FakeClock()
    returned = run(sup, up.run(), clock, step_s=0.01)
    res = up.result
    assert isinstance(res, UpgradeResult) and res.outcome is P.COMMITTED and res.ok
    assert returned is res  # what run() hands its caller is the record itself
    new = [w.pid for w in sup.rt.workers if w.generation == 2]
    assert res.pids_stopped == tuple(old) and res.pids_started == tuple(new)
    assert res.pids_kept == () and res.to_version == "2" and res.restore is None
    assert set(res.phase_s) == {P.PLANNING, P.DRAINING, P.STARTING}  # every phase it left
    assert res.to_json()["outcome"] == "committed" and "devices" not in res.to_json()

    # A failed surge keeps every old worker, stops none, and says so.
    sup = FakeSupervisor(("cpu", "cpu"), lambda rec: rec.slot == 0)
    old = [w.pid for w in sup.rt.workers]
    up = upgrade(sup, "surge")
    run(sup, up.run(), FakeClock())
    assert up.result is not None and up.result.outcome is P.ROLLED_BACK
    assert up.result.pids_kept == tuple(old) and up.result.pids_stopped == ()
    assert up.result.to_version == "1" and "would not load" in up.result.reason

    # A failed restore is its own outcome, with the restore's reason.
    sup = FakeSupervisor(("cpu", "cpu"), lambda rec: rec.slot == 0 and rec.generation == 2)
    up = upgrade(sup, "drain-first")
    run(sup, up.run(), FakeClock())
    assert up.result is not None and up.result.outcome is P.RESTORE_FAILED
    assert up.result.restore == Restore(False, up.result.restore.reason)  # type: ignore[union-attr]
    assert "would not load" in up.result.restore.reason  # type: ignore[union-attr]
