"""Upgrades through the real core: the supervisor, its scheduler and ``pool.upgrade``,
with a fake clock, fake NVML for cuda:0 and cuda:1, fake queues and a fake spawner and
workers (tests/opskit.py). No process is started and nothing sleeps.

Covers a surge, drain-first across two devices (one device at a time, never two copies
on one), a failed upgrade that rolls back, a failed restore (its own outcome), a switch
the state store cannot record, and every move of the upgrade phase table taken by a
real plan.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from corekit import Core
from opskit import BASE, CTX, MODEL, FakeDevices, World

from pool.commands import Activate, ObserveUpgrade, SendControl, Spawn
from pool.lifecycle import WorkerState
from pool.metrics import PoolMetrics
from pool.shell import Shell
from pool.state import StateStore
from pool.upgrade_phases import TRANSITIONS, UpgradePhase
from pool.upgrade_result import UpgradeResult

P = UpgradePhase
TWO = ("cuda:0", "cuda:1")
ONE_COPY = BASE + CTX + MODEL  # a device with one worker loaded
ROOM_FOR_ONE = FakeDevices(total=ONE_COPY + (100 << 20)).total  # auto: no room for two


def world(
    tmp_path: Path,
    fate: Callable[[dict[str, Any]], bool] = lambda spec: True,
    devices: tuple[str, ...] = TWO,
    total: int = 80 << 30,
    store: StateStore | None = None,
    **pool: Any,
) -> World:
    settings: dict[str, Any] = {"watch_requests": 0, **pool}
    core = Core(tmp_path, devices, memory=FakeDevices(total=total), store=store, **settings)
    w = World(core, fate)
    w.run_until(w.serving)
    return w


def serving(w: World) -> list[tuple[str, str]]:
    """(device, version) of every ready worker of the serving generation."""
    rt = w.core.rt
    return sorted(
        (r.device, r.version)
        for r in rt.workers
        if r.generation == rt.serving_gen and r.state is WorkerState.READY
    )


def at(w: World, pred: Callable[[Any], bool]) -> int:
    """The index of the first command the core decided that matches ``pred``."""
    return next(i for i, c in enumerate(w.commands) if pred(c))


def spawn_of(version: str, device: str) -> Callable[[Any], bool]:
    return lambda c: (
        isinstance(c, Spawn) and c.spec["version"] == version and c.spec["device"] == device
    )


def stop_of(wid: bytes) -> Callable[[Any], bool]:
    return lambda c: isinstance(c, SendControl) and c.wid == wid and c.message["t"] == "stop"


def failing(version: str, device: str) -> Callable[[dict[str, Any]], bool]:
    """A fate: workers of ``version`` on ``device`` fail to load."""
    return lambda spec: not (spec["version"] == version and spec["device"] == device)


def history(tmp_path: Path) -> list[str]:
    return [e["outcome"] for e in StateStore(str(tmp_path)).load("m").history]


def test_a_surge_switches_to_the_new_workers_before_the_old_ones_stop(tmp_path: Path) -> None:
    w = world(tmp_path)
    old = {r.device: r for r in w.core.rt.workers}
    result = w.upgrade("2", "auto")
    assert result.ok and result.strategy == "surge", result.reason
    assert [p.value for p in result.path] == ["planning", "starting", "retiring", "committed"]
    assert serving(w) == [("cuda:0", "2"), ("cuda:1", "2")]
    switched = at(w, lambda c: isinstance(c, Activate) and c.generation == 2)
    assert len(w.commands[switched].slots) == 2  # both new workers at once
    for rec in old.values():
        assert at(w, stop_of(rec.slot_view.wid)) > switched  # the old served until then
    assert set(result.pids_stopped) == {r.pid for r in old.values()}
    assert result.pids_kept == () and len(result.pids_started) == 2
    assert result.bytes_freed == {"cuda:0": CTX + MODEL, "cuda:1": CTX + MODEL}
    assert result.memory_back is True
    on_disk = StateStore(str(tmp_path)).load("m").current
    assert on_disk is not None and on_disk.version == "2"
    assert history(tmp_path)[-1] == "committed"
    # The metric is a command the shell carries out, not a call from the core.
    (obs,) = [c for c in w.commands if isinstance(c, ObserveUpgrade)]
    assert (obs.model, obs.kind, obs.outcome) == ("m", "upgrade", "committed")
    assert obs.bytes_freed == 2 * (CTX + MODEL) and "boot_s" in obs.phases
    metrics = PoolMetrics()
    Shell(w.core.sup, None, None, w.core.store, None, metrics).run(obs)  # type: ignore[arg-type]
    assert metrics._upgrades == {("m", "upgrade", "committed"): 1}
    assert metrics._bytes_freed == {"m": 2 * (CTX + MODEL)}


def test_drain_first_across_two_devices_replaces_one_device_at_a_time(tmp_path: Path) -> None:
    w = world(tmp_path, total=ROOM_FOR_ONE)
    old = {r.device: r for r in w.core.rt.workers}
    peak = {0: 0, 1: 0}
    turn = w.turn

    def watched_turn() -> None:
        turn()
        for idx in peak:
            used = w.devices.memory(idx)
            assert used is not None
            peak[idx] = max(peak[idx], used[0])

    w.turn = watched_turn  # type: ignore[method-assign]
    result = w.upgrade("2", "auto")
    assert result.ok and result.strategy == "drain-first", result.reason
    path = [p.value for p in result.path]
    assert path == ["planning", "draining", "starting", "draining", "starting", "committed"]
    assert peak == {0: ONE_COPY, 1: ONE_COPY}  # never two models on one device
    # cuda:0 first: its old worker stops before its new one is spawned, while cuda:1's
    # old worker serves on; cuda:1 follows once cuda:0's new worker is ready.
    stop0, stop1 = (at(w, stop_of(old[d].slot_view.wid)) for d in TWO)
    spawn0, spawn1 = at(w, spawn_of("2", "cuda:0")), at(w, spawn_of("2", "cuda:1"))
    switched = at(w, lambda c: isinstance(c, Activate) and c.generation == 2)
    assert stop0 < spawn0 < switched < stop1 < spawn1
    assert [len(c.slots) for c in w.commands[switched:] if isinstance(c, Activate)][:1] == [1]
    assert serving(w) == [("cuda:0", "2"), ("cuda:1", "2")]
    assert result.memory_back is True  # each device came back to its level without it
    assert result.bytes_freed == {"cuda:0": CTX + MODEL, "cuda:1": CTX + MODEL}
    assert "held_s" in result.steps_s


def test_a_failed_surge_rolls_back_and_the_old_workers_never_stopped(tmp_path: Path) -> None:
    w = world(tmp_path, fate=failing("2", "cuda:1"))
    old = sorted(r.pid for r in w.core.rt.workers)
    result = w.upgrade("2", "surge")
    assert not result.ok and result.outcome is P.ROLLED_BACK
    assert [p.value for p in result.path] == ["planning", "starting", "abandoning", "rolled_back"]
    assert "would not load" in result.reason and result.restore is None
    assert sorted(result.pids_kept) == old and result.pids_stopped == ()
    assert 2 not in w.activations()  # the table never pointed at version 2
    assert serving(w) == [("cuda:0", "1"), ("cuda:1", "1")]
    assert w.core.rt.workers and all(r.version == "1" for r in w.core.rt.workers)
    assert history(tmp_path) == ["committed", "rolled_back"]  # the start, then this


def test_a_failed_drain_first_puts_the_old_version_back(tmp_path: Path) -> None:
    w = world(tmp_path, fate=failing("2", "cuda:1"), total=ROOM_FOR_ONE)
    result = w.upgrade("2", "drain-first")
    assert result.outcome is P.ROLLED_BACK and not result.ok
    assert result.restore is not None and result.restore.ok
    assert [p.value for p in result.path][-3:] == ["abandoning", "rolling_back", "rolled_back"]
    assert serving(w) == [("cuda:0", "1"), ("cuda:1", "1")]  # cuda:0 was switched back too
    current = StateStore(str(tmp_path)).load("m").current
    assert current is not None and current.version == "1"


def test_a_failed_restore_is_reported_as_such_not_as_rolled_back(tmp_path: Path) -> None:
    started: list[str] = []

    def fate(spec: dict[str, Any]) -> bool:
        # Version 2 fails on cuda:1, and version 1 will not come back there either.
        started.append(spec["version"])
        return spec["device"] == "cuda:0" or len(started) <= 2

    w = world(tmp_path, fate=fate, total=ROOM_FOR_ONE)
    result = w.upgrade("2", "drain-first")
    assert not result.ok and result.outcome is P.RESTORE_FAILED
    assert result.restore is not None and not result.restore.ok
    assert "would not load" in result.restore.reason
    assert result.to_json()["outcome"] == "restore_failed"
    assert history(tmp_path)[-1] == "restore_failed"
    assert serving(w) == [("cuda:0", "1")]  # fewer slots than before: said, not hidden


class FullDisk(StateStore):
    def commit_current(self, state: Any, deployed: Any) -> None:
        raise OSError(28, "No space left on device")


def test_a_switch_the_store_cannot_record_is_not_made(tmp_path: Path) -> None:
    w = world(tmp_path, store=FullDisk(str(tmp_path)))
    result = w.upgrade("2", "surge")
    assert result.outcome is P.ROLLED_BACK
    assert result.reason.startswith("state: cannot record the switch (No space left")
    assert 2 not in w.activations()
    assert serving(w) == [("cuda:0", "1"), ("cuda:1", "1")]


# ---------------------------------------------------------------- every phase move


def serve_new(w: World, errors: bool) -> Callable[[], None]:
    """Each turn, every routed worker of version 2 answers one request (an error if
    ``errors``), as its heartbeats would say."""
    turn = w.turn

    def serving_turn() -> None:
        turn()
        rt = w.core.rt
        for r in rt.workers:
            if r.version == "2" and r.generation == rt.serving_gen and r.alive:
                r.answered += 1
                r.model_errors += errors

    return serving_turn


PLANS: dict[str, dict[str, Any]] = {
    "surge": {},
    "surge, a new worker fails": {"fate": failing("2", "cuda:1")},
    "surge, watched": {"watch": False},
    "surge, watched and failing": {"watch": True},
    "drain-first": {"strategy": "drain-first"},
    "drain-first, watched": {"strategy": "drain-first", "watch": False},
    "drain-first on one device, watched": {
        "strategy": "drain-first", "watch": False, "devices": ("cuda:0",)
    },
    "drain-first, watched and failing": {"strategy": "drain-first", "watch": True},
    "drain-first, restore fails": {"strategy": "drain-first", "restore_fails": True},
    "staged": {"strategy": "drain-first", "standby": True},
    "staged, watched": {"strategy": "drain-first", "standby": True, "watch": False},
    "staging fails": {"strategy": "drain-first", "standby": True, "fate": failing("2", "cuda:0")},
}


def run_plan(tmp_path: Path, plan: dict[str, Any]) -> UpgradeResult:
    fate = plan.get("fate", lambda spec: True)
    if plan.get("restore_fails"):
        spawned: list[str] = []

        def fate(spec: dict[str, Any]) -> bool:
            spawned.append(spec["version"])
            return spec["device"] == "cuda:0" or len(spawned) <= 2

    pool: dict[str, Any] = {}
    if "watch" in plan:
        pool = {"watch_requests": 10, "watch_s": 5.0}
    if plan.get("standby"):
        pool["standby"] = True
    w = world(tmp_path, fate=fate, devices=plan.get("devices", TWO), **pool)
    if "watch" in plan:
        w.turn = serve_new(w, plan["watch"])  # type: ignore[method-assign]
    return w.upgrade("2", plan.get("strategy", "surge"))


def test_every_move_of_the_phase_table_is_taken_by_a_real_plan(tmp_path: Path) -> None:
    taken: set[tuple[P, P]] = set()
    for n, (name, plan) in enumerate(PLANS.items()):
        result = run_plan(tmp_path / str(n), plan)
        assert result.path[0] is P.PLANNING and result.path[-1].terminal, name
        moves = set(zip(result.path, result.path[1:], strict=False))
        assert all(b in TRANSITIONS[a] for a, b in moves), (name, result.path)
        taken |= moves
    table = {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts}
    assert taken == table, sorted(f"{a.value} -> {b.value}" for a, b in table - taken)


@pytest.mark.parametrize("name", ["staged", "staging fails", "drain-first, restore fails"])
def test_each_plan_ends_where_it_should(tmp_path: Path, name: str) -> None:
    result = run_plan(tmp_path, PLANS[name])
    want = {
        "staged": P.COMMITTED,
        "staging fails": P.ROLLED_BACK,
        "drain-first, restore fails": P.RESTORE_FAILED,
    }[name]
    assert result.outcome is want, (result.path, result.reason)
    if name == "staged":
        assert result.staged and result.standbys_taken == 2 and result.memory_back is True
