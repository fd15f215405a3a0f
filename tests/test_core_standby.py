"""The hot standbys' lifecycle through the real core: fake clock, fake ports, no process.

``pool.standby.Standbys`` as the real supervisor builds it (tests/corekit.py: its
spawner port, clock and outbox), in the fake world of tests/opskit.py (a spawner that
forks standbys and workers, NVML for cuda:0 and cuda:1), and alone; both over
tests/standbykit.py. Covers: forked ahead of need once the device is idle, taken on
upgrade / crash replacement / recycle, replenished behind, replaced when it dies (after
a growing back-off, then given up), never counted as serving, ``standby = false`` or a
CPU device under ``auto`` forking none, and the standby's context in the device
footprint (auto's room check, the retire proof's level, the memory sample).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from opskit import BASE, CTX, MODEL, World
from standbykit import Kit, forks, waiting, world

from pool.commands import Activate, AddWorker, ObserveExit, RemoveDir, SampleMemory, Signal, Spawn
from pool.device_memory import choose_strategy
from pool.events import StopAll
from pool.lifecycle import IllegalTransition, WorkerState
from pool.model_lifecycle import ModelStatus
from pool.operations import start_recycle
from pool.preload import PreloadSpec
from pool.standby import TRANSITIONS, StandbyRecord, StandbyState
from pool.supervisor import SAMPLE_EVERY_S

S = StandbyState


def spawns(w: World, since: int = 0) -> list[Spawn]:
    return [c for c in w.commands[since:] if isinstance(c, Spawn)]


def ready(w: World) -> list[Any]:
    rt = w.core.rt
    serving = [r for r in rt.workers if r.generation == rt.serving_gen]
    return [r for r in serving if r.state is WorkerState.READY]


def never_served(w: World, pid: int) -> None:
    """``pid`` (a standby's) never had a worker row, a route or a worker record."""
    sup = w.core.sup
    assert pid not in sup.by_pid
    wids = {c.wid for c in w.commands if isinstance(c, Spawn)}  # every worker's, ever
    for cmd in w.commands:
        if isinstance(cmd, Activate):
            assert {s.wid for s in cmd.slots} <= wids
        elif isinstance(cmd, AddWorker):
            assert cmd.slot.wid in wids
    assert all(r.pid != pid for rt in sup.models.values() for r in rt.workers if r.alive)


# ------------------------------------------------------------------ ahead, behind


def test_a_standby_is_forked_ahead_of_need_once_nothing_boots_on_its_device(
    tmp_path: Path,
) -> None:
    w = world(tmp_path)
    (first,) = w.core.rt.workers
    # Every worker on a standby device starts in one: the first took one forked at once.
    assert first.from_standby and len(forks(w)) == 1
    assert first.ready_at is not None
    sb = waiting(w)
    assert len(forks(w)) == 2
    assert forks(w)[1][0] >= first.ready_at  # not while the worker was loading
    assert sb.forked_at == forks(w)[1][0] and sb.ready_at is not None  # the core's clock
    never_served(w, sb.pid or 0)
    assert w.core.rt.status() is ModelStatus.SERVING and len(ready(w)) == 1
    # It stays the one standby: nothing more is forked while it waits.
    w.run_until(lambda: w.core.now > sb.forked_at + 10)
    assert len(forks(w)) == 2 and w.core.sup.standbys.current["cuda:0"] is sb
    (desc,) = w.core.sup.standbys.describe()
    assert desc["state"] == "waiting" and desc["age_s"] == round(w.core.now - sb.forked_at, 1)


def test_one_standby_per_device_that_wants_one(tmp_path: Path) -> None:
    w = world(tmp_path, devices=("cuda:0", "cuda:1"))
    a, b = waiting(w, "cuda:0"), waiting(w, "cuda:1")
    assert a.pid != b.pid and sorted(d for _, d in forks(w)) == ["cuda:0"] * 2 + ["cuda:1"] * 2
    assert w.core.sup.standbys.summary()["wanted"] == ["cuda:0", "cuda:1"]


def test_an_upgrade_starts_in_the_waiting_standby_and_one_is_forked_behind(
    tmp_path: Path,
) -> None:
    w = world(tmp_path)
    sb = waiting(w)
    start, asked = len(w.commands), len(forks(w))
    began = w.core.now
    result = w.upgrade("2", "surge")
    assert result.ok and result.standbys_taken == 1, result.reason
    (spawn,) = spawns(w, start)
    assert spawn.standby is not None and spawn.standby.pid == sb.pid and spawn.standby.waited
    assert sb.state is S.TAKEN and sb.pid in {r.pid for r in ready(w)}
    assert [r.version for r in ready(w)] == ["2"]
    # No fork while the upgrade ran (its CUDA init would compete with the load, and a
    # context appearing mid-operation would move the levels the retire proof compares).
    assert all(not began <= t <= w.core.now for t, _ in forks(w)[asked:])
    behind = waiting(w)
    assert behind.pid != sb.pid and behind.forked_at > w.core.now - 30
    assert forks(w)[asked][0] >= max(r.ready_at or 0 for r in ready(w))
    assert w.core.sup.standbys.taken == {"cuda:0": 2}  # the first worker's, this one


def test_a_crash_takes_the_waiting_standby_at_once(tmp_path: Path) -> None:
    w = world(tmp_path)
    sb = waiting(w)
    (old,) = w.core.rt.workers
    start = len(w.commands)
    died_at = w.core.now
    w._exit(w.procs[old.pid or 0], signal.SIGKILL)
    # Taken as the exit is reported, in the same handle: no back-off, no tick to wait.
    (spawn,) = spawns(w, start)
    assert spawn.standby is not None and spawn.standby.pid == sb.pid
    assert not w.core.rt.restarts and w.core.now == died_at
    # Until the replacement is ready the model is not serving: the standby never counts.
    assert w.core.rt.status() is ModelStatus.STARTING and not ready(w)
    w.run_until(w.serving)
    (new,) = ready(w)
    assert new.pid == sb.pid and new.from_standby and new.timings["spawn_to_ready_s"] < 1.0
    assert ObserveExit("m", "crashed") in w.commands[start:]
    behind = waiting(w)
    assert behind.pid not in (sb.pid, old.pid)
    never_served(w, behind.pid or 0)


def test_a_recycle_takes_the_standby(tmp_path: Path) -> None:
    w = world(tmp_path)
    sb = waiting(w)
    (old,) = w.core.rt.workers
    start = len(w.commands)
    start_recycle(w.core.sup, w.core.rt, old, "max_requests")
    w.take(w.core.answer(w.core.sup.take_commands()))
    w.run_until(lambda: w.core.rt.busy is None and not old.alive)
    (spawn,) = spawns(w, start)
    assert spawn.standby is not None and spawn.standby.pid == sb.pid
    assert old.exit_reason == "recycled" and [r.pid for r in ready(w)] == [sb.pid]
    assert waiting(w).pid != sb.pid  # replenished behind it


# ------------------------------------------------------------------------- deaths


def test_a_standby_that_dies_is_replaced_after_its_back_off(tmp_path: Path) -> None:
    w = world(tmp_path)
    sb = waiting(w)
    start, asked = len(w.commands), len(forks(w))
    died_at = w.core.now
    w._exit(w.procs[sb.pid or 0], signal.SIGKILL)
    assert w.core.sup.standbys.died == {"cuda:0": 1} and sb.state is S.EXITED
    again = waiting(w)
    (when, _), *_ = forks(w)[asked:]
    assert when >= died_at + 0.5  # the first back-off of the flapping guard
    assert when < died_at + 0.5 + 0.1  # and at the next tick after it
    assert again.pid != sb.pid
    # A standby's death is not a worker's: no restart, no exit metric, still serving.
    assert not any(isinstance(c, ObserveExit) for c in w.commands[start:])
    assert not w.core.rt.restarts and w.core.rt.status() is ModelStatus.SERVING


def test_deaths_back_off_longer_each_time_then_the_device_gives_up() -> None:
    kit = Kit(now=100.0)
    sb = kit.standbys
    sb.want(["cuda:0"])
    delays: list[float] = []
    for n in range(5):
        sb.tick(kit.now, set())
        assert len(kit.asked) == n + 1
        token = len(kit.asked)
        sb.on_spawned(token, 5000 + n)
        died_at = kit.now
        assert sb.on_exited(5000 + n, signal.SIGSEGV)  # dies while preparing
        if n == 4:
            break
        due = sb.next_try["cuda:0"]
        delays.append(due - died_at)
        kit.now = due - 0.01
        sb.tick(kit.now, set())
        assert len(kit.asked) == n + 1  # not before its back-off
        kit.now = due
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert "keep dying" in sb.given_up["cuda:0"] and sb.died == {"cuda:0": 5}
    kit.now += 1000
    sb.tick(kit.now, set())
    assert len(kit.asked) == 5  # given up: workers there start cold
    assert not sb.available("cuda:0") and sb.take("cuda:0") is None


def test_a_standby_that_reached_waiting_resets_its_back_off() -> None:
    kit = Kit(now=10.0)
    sb = kit.standbys
    sb.want(["cuda:0"])
    for pid in (7001, 7002, 7003):
        sb.tick(kit.now, set())
        sb.on_spawned(len(kit.asked), pid)
        sb.on_ready({"pid": pid, "prep_s": 0.2})
        assert sb.current["cuda:0"].ready_at == kit.now
        sb.on_exited(pid, signal.SIGKILL)
        assert sb.next_try["cuda:0"] == kit.now + 0.5  # each time the first back-off
        kit.now += 0.5
    assert sb.died == {"cuda:0": 3} and not sb.given_up


def test_a_let_go_standby_is_signalled_through_the_outbox_and_its_run_dir_removed(
    tmp_path: Path,
) -> None:
    model = tmp_path / "v.pt"
    model.write_bytes(b"x" * 100)
    kit = Kit()
    sb = kit.standbys
    sb.preload_target = lambda device: PreloadSpec(
        "m", "1", str(model), True, False, (str(tmp_path),), "/run/w"
    )
    sb.want(["cpu"])
    sb.tick(0.0, set())
    sb.on_spawned(1, 7001)
    run_dir = "/run/w/" + kit.asked[0]["sid"]
    sb.want([])
    assert kit.commands == [Signal(7001, signal.SIGTERM, 0)]
    assert sb.on_exited(7001, signal.SIGTERM) and sb.died == {}
    assert kit.commands[-1] == RemoveDir(run_dir)
    # One let go while still forking has no pid to signal: the spawner's answer finds
    # it gone and signals it then.
    sb.want(["cpu"])
    sb.tick(1.0, set())
    sb.want([])
    assert sb.on_spawned(2, 7002) and kit.commands[-1] == Signal(7002, signal.SIGTERM, 0)


def test_the_standby_state_table_refuses_what_it_lacks() -> None:
    rec = StandbyRecord("standby.cuda:0.1", "cuda:0")
    for state in (S.PREPARING, S.WAITING, S.TAKEN):
        assert state in TRANSITIONS[rec.state]
        rec.to(state)
    for new in S:
        if new is not S.TAKEN:
            with pytest.raises(IllegalTransition):
                rec.to(new)
    assert TRANSITIONS[S.EXITED] == frozenset() and not rec.alive


# -------------------------------------------------------------------- none wanted


@pytest.mark.parametrize("setting, devices", [(False, ("cuda:0", "cuda:1")), ("auto", ("cpu",))])
def test_no_standby_is_forked_where_none_is_wanted(
    tmp_path: Path, setting: str | bool, devices: tuple[str, ...]
) -> None:
    w = world(tmp_path, devices=devices, standby=setting)
    w.upgrade("2", "surge")
    (victim, *_) = ready(w)
    w._exit(w.procs[victim.pid or 0], signal.SIGKILL)
    w.run_until(lambda: len(ready(w)) == len(devices))
    w.run_until(lambda: w.core.now > 1030)
    assert forks(w) == [] and all(s.standby is None for s in spawns(w))
    assert w.core.sup.standbys.summary()["wanted"] == []
    assert not any(r.from_standby for r in w.core.rt.workers)


# ---------------------------------------------------------------- device memory


def test_the_standby_context_counts_in_the_device_footprint(tmp_path: Path) -> None:
    margin = 512 << 20  # surge_margin_mb
    # Room for a second model beside the standby's context, not for a second context.
    total = BASE + 2 * CTX + 2 * MODEL + margin + (1 << 20)
    w = world(tmp_path, total=total)
    waiting(w)
    devices = w.devices
    used = devices.memory(0)
    assert used is not None and used[0] == BASE + 2 * CTX + MODEL  # worker + standby
    # The level the retire proof compares leaves the bare context out (DeviceMemory port).
    assert w.core.sup.device_level("cuda:0") == BASE + CTX + MODEL
    # auto: the new worker starts in the standby, whose context is there already.
    strategy, why = choose_strategy(w.core.sup, w.core.rt)
    assert strategy == "surge", why
    w.core.sup.standbys.current.pop("cuda:0")  # as if none waited: a context more needed
    assert choose_strategy(w.core.sup, w.core.rt)[0] == "drain-first"


def test_a_spawn_notes_the_device_level_without_the_standby(tmp_path: Path) -> None:
    w = world(tmp_path)
    waiting(w)
    (old,) = w.core.rt.workers
    start = len(w.commands)
    w._exit(w.procs[old.pid or 0], signal.SIGKILL)  # its replacement is spawned at once
    (spawn,) = spawns(w, start)
    new = w.core.sup.by_wid[spawn.wid]
    # Read through the DeviceMemory port before the take, while NVML still shows the
    # standby's context: the level leaves it out (the retire proof compares models).
    used = w.devices.memory(0)
    assert used is not None and used[0] == BASE + CTX
    assert new.device_used_at_spawn == BASE


def test_the_standby_context_comes_with_the_memory_sample(tmp_path: Path) -> None:
    w = world(tmp_path, devices=("cuda:0", "cuda:1"))
    a, b = waiting(w, "cuda:0"), waiting(w, "cuda:1")
    start = len(w.commands)
    w.run_until(lambda: a.gpu_bytes is not None and b.gpu_bytes is not None, SAMPLE_EVERY_S + 1)
    assert (a.gpu_bytes, b.gpu_bytes) == (CTX, CTX)
    asked = [c for c in w.commands[start:] if isinstance(c, SampleMemory)]
    assert asked and asked[-1].devices == (0, 1)
    assert w.core.sup.standbys.devices() == {0, 1}  # sampled for the standbys too


# ------------------------------------------------------------------- no outside


def test_the_standbys_read_no_clock_and_touch_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forked, waiting, taken by a crash, dying, replaced: with the process's clock,
    os.killpg and shutil.rmtree broken. Everything goes through the fakes."""
    w = world(tmp_path)

    def broken(*_: Any) -> Any:
        raise AssertionError("the core reached outside")

    monkeypatch.setattr(time, "monotonic", broken)
    monkeypatch.setattr(os, "killpg", broken)
    monkeypatch.setattr(shutil, "rmtree", broken)
    sb = waiting(w)
    (old,) = w.core.rt.workers
    w._exit(w.procs[old.pid or 0], signal.SIGKILL)
    w.run_until(w.serving)
    again = waiting(w)
    w._exit(w.procs[again.pid or 0], signal.SIGKILL)
    third = waiting(w)
    w.feed(StopAll(w.core.now))  # poold stops: the standby is let go with the workers
    assert Signal(third.pid or 0, signal.SIGTERM, 0) in w.commands
    assert sb.state is S.TAKEN and again.state is S.EXITED
    w.core.sup.standbys.summary()
