"""A retiring worker that holds nothing any more is stopped by the upgrade's own check,
not at the supervisor's next tick (``pool.upgrade_waits.gone_stopping_drained``)."""

from __future__ import annotations

from typing import Any

from pool.lifecycle import WorkerRecord, WorkerState
from pool.upgrade_waits import gone_stopping_drained
from router.table import WorkerSlot


class Sup:
    def __init__(self) -> None:
        self.stopped: list[str] = []

    def stop(self, rec: WorkerRecord) -> None:
        self.stopped.append(rec.wid)
        rec.to(WorkerState.STOPPING)


class Busy(WorkerSlot):
    @property
    def load(self) -> int:
        return 1


def worker(wid: str, slot: WorkerSlot, state: WorkerState) -> WorkerRecord:
    rec = WorkerRecord(wid=wid, model="m", generation=1, slot=0, device="cpu", version="1",
                       path="/m.pt", slot_view=slot)  # fmt: skip
    for s in (WorkerState.STARTING, WorkerState.LOADING, WorkerState.WARMING,
              WorkerState.READY, state):  # fmt: skip
        if rec.can(s):
            rec.to(s)
    assert rec.state is state
    return rec


def test_drained_workers_are_stopped_by_the_check() -> None:
    sup: Any = Sup()
    idle = worker("idle", WorkerSlot(b"idle", "m", 1, "1", 2), WorkerState.DRAINING)
    busy = worker("busy", Busy(b"busy", "m", 1, "1", 2), WorkerState.DRAINING)
    check = gone_stopping_drained(sup, [idle, busy])
    assert not check()
    assert sup.stopped == ["idle"]  # the one still answering a request keeps draining
    assert not check() and sup.stopped == ["idle"]  # stopping already: not again
    idle.to(WorkerState.EXITED)
    busy.to(WorkerState.EXITED)
    assert check()


def test_the_loop_wakes_for_the_next_sample_of_a_sampling_wait() -> None:
    from pool.tasks import Scheduler, Wait

    now = [100.0]
    sched = Scheduler(clock=lambda: now[0])
    assert sched.wake_in_ms(10) == 10  # nothing runs

    def op(every: float) -> Any:
        yield Wait(lambda: False, 5.0, "w", every_s=every)

    sched.start("turns", op(0.0), lambda r: None)
    assert sched.wake_in_ms(10) == 10  # sampled every turn: woken by events, or in 10 ms
    sched.start("nvml", op(0.002), lambda r: None)
    sched.poll()  # asks at once, then every 2 ms
    assert sched.wake_in_ms(10) == 2
    now[0] += 0.0015
    assert sched.wake_in_ms(10) == 1
    now[0] += 0.01
    assert sched.wake_in_ms(10) == 1  # overdue: at once (1 ms is the least)
