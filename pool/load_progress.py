"""Forward a booting worker's loading bytes (``workers.load_progress``) as progress.

The supervisor keeps the ``bytes`` steps each worker reported on its record (several can
arrive in one loop turn); an operation waiting for workers to boot wakes when there are
new ones and reports each as ``loading`` progress with ``bytes`` and ``total``, which
pool-ctl draws as a bar on a terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pool.lifecycle import WorkerRecord

Say = Callable[..., Any]


class LoadingReport:
    """How many of each worker's steps have been said, so each is said once."""

    def __init__(self, recs: list[WorkerRecord]) -> None:
        self.recs = recs
        self.said: dict[str, int] = {}

    def moved(self) -> bool:
        return any(len(r.load_steps) > self.said.get(r.wid, 0) for r in self.recs)

    def say(self, say: Say) -> None:
        for r in self.recs:
            start = self.said.get(r.wid, 0)
            for done in r.load_steps[start:]:
                say("loading", worker=r.wid, bytes=done, total=r.load_total)
            self.said[r.wid] = len(r.load_steps)
