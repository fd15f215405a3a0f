"""pool.rescale's plan and phases, on records alone (the real processes: test_manage)."""

from __future__ import annotations

import pytest

from pool.config import ModelConfig
from pool.lifecycle import IllegalTransition, WorkerRecord, WorkerState
from pool.rescale import TRANSITIONS, RescalePhase, plan
from pool.runtime import ModelRuntime
from pool.state import Deployed, ModelState
from router.table import ModelRoute, WorkerSlot


def runtime(devices: list[str], states: list[WorkerState] | None = None) -> ModelRuntime:
    rt = ModelRuntime(
        cfg=ModelConfig(name="m", path="/m.pt", devices=tuple(devices)),
        route=ModelRoute("m", 8, 5.0, True),
        state=ModelState("m"),
        devices=tuple(devices),
        serving_gen=1,
    )
    rt.gens[1] = Deployed("1", "/m.pt", "sha256:" + "0" * 64)
    for slot, dev in enumerate(devices):
        wid = f"m.g1.s{slot}"
        rec = WorkerRecord(
            wid, "m", 1, slot, dev, "1", "/m.pt", WorkerSlot(wid.encode(), "m", 1, "1", 2)
        )
        rec.state = (states or [WorkerState.READY] * len(devices))[slot]
        rec.pid = 100 + slot
        rt.workers.append(rec)
    return rt


def pids(recs: object) -> list[int | None]:
    return [w.pid for w in recs]  # type: ignore[attr-defined]


def test_scale_up_keeps_every_worker_and_adds_the_new_slots() -> None:
    p = plan(runtime(["cpu"]), ("cpu", "cpu", "cpu"))
    assert [(s, w.pid) for s, w in p.keep] == [(0, 100)]
    assert p.add == (1, 2) and p.remove == ()


def test_scale_down_keeps_the_same_positions_and_retires_the_rest() -> None:
    p = plan(runtime(["cpu", "cpu", "cpu"]), ("cpu",))
    assert [(s, w.pid) for s, w in p.keep] == [(0, 100)]
    assert p.add == () and pids(p.remove) == [101, 102]


def test_a_device_kept_elsewhere_moves_its_worker_to_its_new_slot() -> None:
    p = plan(runtime(["cuda:0", "cuda:1"]), ("cuda:1",))
    assert [(s, w.pid) for s, w in p.keep] == [(0, 101)]
    assert pids(p.remove) == [100] and p.add == ()
    p = plan(runtime(["cuda:0", "cuda:1"]), ("cuda:1", "cuda:2", "cuda:0"))
    assert [(s, w.pid) for s, w in p.keep] == [(0, 101), (2, 100)] and p.add == (1,)


def test_workers_already_going_are_not_kept() -> None:
    rt = runtime(["cpu", "cpu"], [WorkerState.DRAINING, WorkerState.READY])
    p = plan(rt, ("cpu", "cpu"))
    assert [(s, w.pid) for s, w in p.keep] == [(1, 101)] and p.add == (0,)
    assert p.remove == ()  # the draining one is on its way out already


def test_phases_end_in_done_or_failed_and_an_illegal_move_raises() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from pool.rescale import Rescale

    assert {ph for ph in RescalePhase if ph.terminal} == {RescalePhase.DONE, RescalePhase.FAILED}
    core = SimpleNamespace(now=0.0, clock=lambda: 0.0)  # only its clock is read here
    r = Rescale(cast(Any, core), runtime(["cpu"]), ("cpu", "cpu"), 60.0, lambda *a, **k: None)
    r.enter(RescalePhase.STARTING)
    with pytest.raises(IllegalTransition):
        r.enter(RescalePhase.FAILED)  # a failed start abandons first
    r.enter(RescalePhase.RETIRING)
    r.enter(RescalePhase.DONE)
    assert r.path == [RescalePhase.PLANNING, RescalePhase.STARTING, RescalePhase.RETIRING,
                      RescalePhase.DONE]  # fmt: skip
    assert not TRANSITIONS[RescalePhase.DONE]
