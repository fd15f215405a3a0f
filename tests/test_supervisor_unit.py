"""The supervisor as a decision core: events in, commands out, time only from the events.

A real ``Supervisor`` (tests/corekit.py) with a fake clock and no router, spawner or
signal to fake: each test feeds events and asserts on the commands it decides. Covers
the worker lifecycle from spawn to routed, every stop stage (control message, SIGTERM,
SIGKILL, the reap that never came), a hung worker (SIGABRT first), restart back-off
after crashes up to giving up, a worker stopped before its pid was known, memory
samples, recycling, and a heartbeat from a worker being retired.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from corekit import NO_SUCH_PID, Core, only

from pool.commands import (
    Activate,
    AddRoute,
    AddWorker,
    Deactivate,
    FailQueued,
    ObserveExit,
    ProbePid,
    Record,
    Recycle,
    RemoveDir,
    RemoveWorker,
    SampleCpu,
    SampleMemory,
    SendControl,
    Signal,
    Spawn,
)
from pool.events import KillAll, StopAll, Tick, WorkerExited, WorkerOverdue, WorkerUnreachable
from pool.lifecycle import IllegalTransition, WorkerState
from pool.model_lifecycle import TRANSITIONS, ModelStatus
from pool.stopping import KILL_GRACE_S


@pytest.fixture
def core(tmp_path: Path) -> Core:
    return Core(tmp_path)


def test_adding_a_model_routes_it_and_spawns_one_worker_per_device(tmp_path: Path) -> None:
    core = Core(tmp_path, devices=("cpu", "cpu"))
    # Built again to see the commands add_model decides (Core answered them already).
    first = core.sup.models.pop("m")
    core.sup.add_model(core.model, ("cpu", "cpu"), first.gens[1], first.state)
    cmds = core.sup.take_commands()
    kinds = [type(c) for c in cmds]
    assert kinds == [AddRoute, AddWorker, Spawn, AddWorker, Spawn]
    spawns = only(cmds, Spawn)
    assert [s.spec["device"] for s in spawns] == ["cpu", "cpu"]
    assert all(s.standby is None and s.spec["version"] == "1" for s in spawns)


def test_a_worker_goes_spawning_starting_loading_warming_ready_and_is_routed(
    core: Core,
) -> None:
    rec = core.newest()
    assert rec.state is WorkerState.SPAWNING and rec.spawned_at == core.now
    assert core.spawned(rec) == [] and rec.state is WorkerState.STARTING
    assert rec.pid == NO_SUCH_PID and rec.last_heartbeat == core.now
    core.says(rec, t="hello", pid=NO_SUCH_PID)
    assert rec.state is WorkerState.LOADING
    core.says(rec, t="phase", phase="warming")
    assert rec.state is WorkerState.WARMING
    core.says(rec, t="phase", phase="validating")
    assert rec.state is WorkerState.VALIDATING
    core.now += 1.5
    cmds = core.says(rec, t="ready", timings={"load_s": 0.1})
    assert rec.state is WorkerState.READY
    assert rec.timings["spawn_to_ready_s"] == 1.5  # the event's time, no clock read
    (act,) = only(cmds, Activate)
    assert (act.model, act.generation, [s.wid for s in act.slots]) == ("m", 1, [rec.slot_view.wid])
    (rec_cmd,) = only(cmds, Record)
    assert (rec_cmd.action, rec_cmd.outcome, rec_cmd.deployed.version) == (
        "start",
        "committed",
        "1",
    )


def test_every_stop_stage_in_order(core: Core) -> None:
    rec = core.boot()
    wid = rec.slot_view.wid
    core.sup.retire(rec)
    assert core.sup.take_commands() == [Deactivate(rec.slot_view)]
    assert rec.state is WorkerState.DRAINING
    cmds = core.feed(Tick(core.now))  # holds nothing: stop it
    assert rec.state is WorkerState.STOPPING and rec.stop_stage == 1
    assert only(cmds, SendControl) == [SendControl(wid, {"t": "stop"})]
    assert only(core.feed(Tick(core.now + core.pool.stop_timeout_s / 2)), Signal) == []
    core.now += core.pool.stop_timeout_s + 0.1
    assert only(core.feed(Tick(core.now)), Signal) == [Signal(NO_SUCH_PID, signal.SIGTERM, 2)]
    core.now += KILL_GRACE_S + 0.1
    assert only(core.feed(Tick(core.now)), Signal) == [Signal(NO_SUCH_PID, signal.SIGKILL, 3)]
    assert rec.alive  # SIGKILL sent; the reap has not come
    core.live.add(NO_SUCH_PID)  # the process is still there: keep waiting
    core.now += KILL_GRACE_S + 0.1
    assert only(core.feed(Tick(core.now)), ProbePid) == [ProbePid(wid, NO_SUCH_PID)]
    assert rec.alive
    core.live.clear()  # ... and now it is gone without a reap: the shell says so
    cmds = core.feed(Tick(core.now + 0.1))
    assert rec.state is WorkerState.EXITED and not rec.alive
    assert RemoveWorker(wid, lost=False) in cmds
    assert ObserveExit("m", "retired") in cmds
    assert RemoveDir(rec.run_dir) in cmds


def test_a_hung_worker_gets_sigabrt_then_sigkill(core: Core) -> None:
    rec = core.boot()
    late = rec.last_heartbeat + core.pool.heartbeat_timeout_s + 0.1
    cmds = core.feed(Tick(late))
    assert rec.state is WorkerState.STOPPING and rec.stop_stage == 2
    assert cmds[:3] == [
        SampleCpu(rec.slot_view.wid, NO_SUCH_PID),  # silent: is it computing? (no: gone)
        RemoveWorker(rec.slot_view.wid, lost=True),  # its requests are retried now
        Signal(NO_SUCH_PID, signal.SIGABRT, 2),
    ]
    assert rec.failure is not None and "no heartbeat" in rec.failure
    cmds = core.feed(Tick(late + KILL_GRACE_S + 0.1))
    assert only(cmds, Signal) == [Signal(NO_SUCH_PID, signal.SIGKILL, 3)]
    cmds = core.feed(WorkerExited(NO_SUCH_PID, signal.SIGKILL, late + 5))
    assert only(cmds, RemoveWorker) == []  # taken out of routing once, at the kill
    assert only(cmds, ObserveExit) == [ObserveExit("m", "hung")]


def test_unreachable_and_overdue_workers_are_killed(core: Core) -> None:
    rec = core.boot()
    cmds = core.feed(WorkerUnreachable(rec.slot_view.wid, core.now))
    assert only(cmds, Signal) == [Signal(NO_SUCH_PID, signal.SIGABRT, 2)]
    assert core.feed(WorkerOverdue(rec.slot_view.wid, core.now)) == []  # already stopping
    cmds = core.feed(WorkerExited(NO_SUCH_PID, signal.SIGABRT, core.now))
    assert only(cmds, ObserveExit) == [ObserveExit("m", "crashed")]
    assert not rec.alive and len(core.rt.restarts) == 1  # replaced after a back-off


def test_crashes_restart_with_growing_back_off_then_give_up(core: Core) -> None:
    """A worker that crashes while loading, every time (a ready one would reset the
    count): restarted after 0.5 s, 1 s, 2 s, ..., then the model is failed."""
    rt = core.rt
    delays = []
    for crash in range(rt.flap.attempts):
        rec, pid = core.newest(), NO_SUCH_PID + crash
        core.spawned(rec, pid)
        core.says(rec, t="hello", pid=pid)
        cmds = core.feed(WorkerExited(pid, signal.SIGSEGV, core.now))
        assert rec.state is WorkerState.EXITED
        assert RemoveWorker(rec.slot_view.wid, lost=True) in cmds
        assert ObserveExit("m", "boot_failed") in cmds
        if rt.failed:
            (fail,) = only(cmds, FailQueued)
            assert fail.code == "MODEL_UNAVAILABLE" and "gave up" in fail.why
            break
        ((when, slot),) = rt.restarts
        delays.append(when - core.now)
        assert only(core.feed(Tick(when - 0.05)), Spawn) == []  # not yet
        (spawn,) = only(core.feed(Tick(when + 0.01)), Spawn)
        assert spawn.spec["device"] == "cpu" and not rt.restarts and slot == 0
        core.now = when + 0.01
    assert rt.failed is not None and "gave up" in rt.failed
    assert len(delays) == rt.flap.attempts - 1, delays
    assert all(b > a for a, b in zip(delays, delays[1:], strict=False)), delays


def test_a_worker_stopped_before_its_pid_came_is_killed_when_it_does(core: Core) -> None:
    rec = core.newest()
    core.sup.stop(rec)  # e.g. an upgrade abandoned it at once
    assert only(core.sup.take_commands(), Signal) == []  # no pid to signal yet
    cmds = core.spawned(rec)
    assert only(cmds, Signal) == [Signal(NO_SUCH_PID, signal.SIGKILL, 1)]


def test_memory_is_sampled_every_few_seconds_and_at_ready(tmp_path: Path) -> None:
    core = Core(tmp_path, devices=("cuda:0",))
    core.nvml[0] = {NO_SUCH_PID: 3 << 30}
    rec = core.newest()
    core.spawned(rec)
    core.says(rec, t="hello", pid=NO_SUCH_PID)
    cmds = core.says(rec, t="ready", timings={})
    assert SampleMemory((0,)) in cmds
    assert rec.gpu_bytes == rec.ready_gpu_bytes == 3 << 30
    core.nvml[0] = {NO_SUCH_PID: 4 << 30}
    assert only(core.feed(Tick(core.now + 2.1)), SampleMemory) == [SampleMemory((0,))]
    assert rec.gpu_bytes == 4 << 30 and rec.ready_gpu_bytes == 3 << 30
    assert only(core.feed(Tick(core.now + 2.2)), SampleMemory) == []  # 0.1 s later: not due


def test_a_heartbeat_from_a_retiring_worker_changes_nothing(core: Core) -> None:
    rt = core.rt
    rec = core.boot()
    rec.recycle_after = 1
    rec.slot_view.final_served = 5  # past max_requests: a READY worker is recycled
    cmds = core.says(rec, t="hb")
    why = "served 5 requests (max_requests)"
    assert only(cmds, Recycle) == [Recycle("m", rec.slot_view.wid, why)]
    core.sup.retire(rec)
    core.sup.take_commands()
    cmds = core.says(rec, t="hb", rss=1 << 20, batches=[[1, 2]])
    assert only(cmds, Recycle) == []
    assert rec.state is WorkerState.DRAINING and rt.busy is None and rec.rss == 1 << 20


def test_a_heartbeat_from_a_removed_models_worker_changes_nothing(core: Core) -> None:
    rec = core.boot()
    rec.recycle_after = 1
    rec.slot_view.final_served = 5
    core.sup.models.pop("m")  # a reload removed the model; its worker still drains
    assert only(core.says(rec, t="hb"), Recycle) == []


def test_stop_all_then_kill_all(tmp_path: Path) -> None:
    core = Core(tmp_path, devices=("cpu", "cpu"))
    ready = core.boot(core.rt.workers[0], pid=NO_SUCH_PID)
    booting = core.rt.workers[1]
    core.spawned(booting, pid=NO_SUCH_PID + 1)
    cmds = core.feed(StopAll(core.now))
    assert ready.state is WorkerState.DRAINING and booting.state is WorkerState.STOPPING
    assert SendControl(booting.slot_view.wid, {"t": "stop"}) in cmds
    assert not core.sup.all_exited()
    assert only(core.feed(KillAll(core.now)), Signal) == [
        Signal(NO_SUCH_PID, signal.SIGKILL, 0),
        Signal(NO_SUCH_PID + 1, signal.SIGKILL, 1),
    ]


def test_the_core_reads_no_clock(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole life, from spawn to a crash, its restart and a retire, with every clock
    of the process broken: the supervisor gets the time from its events only."""

    def no_clock() -> float:
        raise AssertionError("the supervisor read a clock")

    monkeypatch.setattr(time, "monotonic", no_clock)
    rec = core.boot()
    core.feed(WorkerExited(NO_SUCH_PID, signal.SIGSEGV, core.now + 1))
    ((when, _),) = core.rt.restarts
    core.feed(Tick(when + 0.01))
    again = core.boot(pid=NO_SUCH_PID + 1)
    core.sup.retire(again)
    core.answer(core.sup.take_commands())
    for step in range(1, 40):
        core.feed(Tick(when + step))
    assert not rec.alive and not again.alive


def test_the_model_lifecycle_is_stored_and_moves_only_along_its_table(core: Core) -> None:
    rt = core.rt
    seen = [rt.status()]

    def look() -> None:
        if rt.status() is not seen[-1]:
            assert rt.status() in TRANSITIONS[seen[-1]], (seen[-1], rt.status())
            seen.append(rt.status())

    rec = core.boot()
    look()
    core.feed(WorkerExited(NO_SUCH_PID, signal.SIGSEGV, core.now))  # its only worker died
    look()
    for crash in range(rt.flap.attempts):  # then every replacement dies while loading
        ((when, _),) = rt.restarts
        core.now = when + 0.01
        core.feed(Tick(core.now))
        rec, pid = core.newest(), NO_SUCH_PID + 1 + crash
        core.spawned(rec, pid)
        core.feed(WorkerExited(pid, signal.SIGSEGV, core.now))
        look()
        if rt.failed:
            break
    assert rt.failed is not None and rt.status() is ModelStatus.FAILED
    rt.begin("upgrade")  # what start_operation does; the model stays failed ...
    look()
    core.sup.clear_failed(rt)  # ... until the upgrade recovers it
    look()
    rt.end()  # no ready worker of the serving generation yet
    look()
    rt.unload()
    look()
    assert seen == [
        ModelStatus.STARTING,
        ModelStatus.SERVING,
        ModelStatus.STARTING,
        ModelStatus.FAILED,
        ModelStatus.UPGRADING,
        ModelStatus.STARTING,
        ModelStatus.UNLOADING,
    ], seen
    with pytest.raises(IllegalTransition, match="unloading -> serving"):
        rt.move(ModelStatus.SERVING)  # an unloading model never serves again


def test_a_failed_model_recovers_only_through_an_operation(core: Core) -> None:
    core.rt.fail("gave up")
    assert core.rt.status() is ModelStatus.FAILED
    with pytest.raises(IllegalTransition, match="failed -> starting"):
        core.rt.recover()  # no operation began: nothing may bring it back by itself
    core.feed(Tick(core.now + 1))  # settling leaves a failed model failed
    assert core.rt.status() is ModelStatus.FAILED


def test_a_silent_worker_using_cpu_is_left_alone_until_it_stops(core: Core) -> None:
    """Silence alone is not a hang: the CPU samples the shell answers decide."""
    rec = core.boot()
    beat, step = rec.last_heartbeat, 0.5
    core.cpu[NO_SUCH_PID] = 100.0
    t = beat + 2 * core.pool.heartbeat_interval_s + 0.1  # silent: sampling starts
    cmds = core.feed(Tick(t))
    assert only(cmds, SampleCpu) == [SampleCpu(rec.slot_view.wid, NO_SUCH_PID)]
    for _ in range(int(2 * core.pool.heartbeat_timeout_s / step)):  # a long forward
        t += step
        core.cpu[NO_SUCH_PID] += step  # one core busy
        assert only(core.feed(Tick(t)), Signal) == []
    assert rec.state is WorkerState.READY
    stuck = t  # from here on it uses no CPU
    while only(core.feed(Tick(t)), Signal) == []:
        t += step
        assert t - stuck < core.pool.heartbeat_timeout_s + 2 * step
    assert rec.state is WorkerState.STOPPING and rec.failure is not None
    assert "no CPU time used" in rec.failure
