"""Long operations (upgrades, rollbacks, recycles) as generators run by the event loop.

An operation is written as straight-line code that ``yield``s a :class:`Wait`; the loop
resumes it with ``True`` once the condition holds or ``False`` when the wait timed out.
Nothing blocks the loop, so routing continues while an upgrade waits for a worker.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from pool.op_result import OpCrashed

log = logging.getLogger(__name__)


@dataclass
class Wait:
    until: Callable[[], bool]
    timeout_s: float
    what: str = ""
    # How often ``until`` is asked. 0: every loop turn, for checks that only read our own
    # records. A check that queries the outside (NVML) names its own period, so it costs
    # a few queries a second, not one per turn, and "two equal readings in a row" means
    # readings one period apart.
    every_s: float = 0.0


Operation = Generator[Wait, bool, Any]


class Task:
    def __init__(
        self,
        name: str,
        op: Operation,
        done: Callable[[Any], None],
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.op = op
        self.done = done
        self.clock = clock
        self.wait: Wait | None = None
        self.deadline = 0.0
        self.next_check = 0.0  # when ``wait.until`` is next asked
        self.finished = False

    def step(self, value: bool | None) -> None:
        try:
            wait = self.op.send(value)  # type: ignore[arg-type]  # first send must be None
        except StopIteration as stop:
            self.finished = True
            self.done(stop.value)
            return
        self.wait = wait
        now = self.clock()
        self.deadline = now + wait.timeout_s
        self.next_check = now  # the next poll asks at once; then every wait.every_s


class Scheduler:
    def __init__(self, clock: Callable[[], float]) -> None:
        # The core's clock (Supervisor.clock): deadlines and sampling periods run on
        # the time of the events, so a test moves them with a fake one.
        self.tasks: list[Task] = []
        self.clock = clock

    def start(self, name: str, op: Operation, done: Callable[[Any], None]) -> Task:
        task = Task(name, op, done, self.clock)
        self.tasks.append(task)
        self._step(task, None)
        return task

    def _step(self, task: Task, value: bool | None) -> None:
        try:
            task.step(value)
        except Exception:
            log.exception("operation %s crashed", task.name)
            task.finished = True
            task.done(OpCrashed(f"internal error in {task.name}; see poold's log"))

    def poll(self) -> None:
        """Resume every task whose wait is over. Called on each loop iteration."""
        now = self.clock()
        for task in list(self.tasks):
            if task.finished or task.wait is None:
                continue
            if now < task.next_check and now < task.deadline:
                continue  # not this wait's moment to sample
            task.next_check = now + task.wait.every_s
            try:
                met = task.wait.until()
            except Exception:
                log.exception("wait condition of %s raised", task.name)
                met = False
            if met:
                self._step(task, True)
            elif now >= task.deadline:
                self._step(task, False)
        self.tasks = [t for t in self.tasks if not t.finished]

    def busy(self) -> bool:
        return bool(self.tasks)

    def wake_in_ms(self, most_ms: int) -> int:
        """How long the loop may sleep before a sampling wait (``every_s`` > 0) is due:
        at most ``most_ms``, at least 1. Waits sampled every turn (``every_s`` 0) wake on
        the events that move them, or after ``most_ms``."""
        now = self.clock()
        due = [
            t.next_check - now
            for t in self.tasks
            if not t.finished and t.wait is not None and t.wait.every_s > 0
        ]
        if not due:
            return most_ms
        return max(1, min(most_ms, math.ceil(min(due) * 1000)))
