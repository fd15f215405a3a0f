"""Wait conditions an operation's steps yield on (``pool.tasks.Wait``): each reads the
workers' records, and one also stops a drained worker the moment it sees it."""

from __future__ import annotations

from collections.abc import Callable

from pool.lifecycle import WorkerRecord, WorkerState
from pool.supervisor import Supervisor


def changed_state(recs: list[WorkerRecord]) -> Callable[[], bool]:
    """A condition: some worker of ``recs`` changed state since now."""
    before = [r.state for r in recs]
    return lambda: [r.state for r in recs] != before


def gone_stopping_drained(sup: Supervisor, recs: list[WorkerRecord]) -> Callable[[], bool]:
    """A condition: every worker of ``recs`` has exited. One that has drained (holds no
    request any more) is stopped as soon as a check sees it, not at the next tick (up to
    50 ms later, which a drain-first upgrade's clients would wait out)."""

    def check() -> bool:
        for r in recs:
            if r.state is WorkerState.DRAINING and not r.slot_view.load:
                sup.stop(r)
        return not any(r.alive for r in recs)

    return check
