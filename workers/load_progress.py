"""Bytes of the model file a worker has loaded, reported to poold while it loads.

The worker's load runs on its main thread, which owns the event socket; the loaders
call ``LoadMeter.add`` as bytes arrive (``workers.weights``), and the meter sends
``{"t": "phase", "phase": "loading", "bytes": done, "total": size}`` once every
1/32 of the file (at least every ``MIN_STEP`` bytes apart) and once at the end. poold
forwards these to pool-ctl as progress (a bar on a terminal).
"""

from __future__ import annotations

import os
from collections.abc import Callable

MIN_STEP = 1 << 20  # a report per MiB at most: a few MB model still shows steps
REPORTS = 32  # at most this many reports (plus the first and the last) per load

Send = Callable[[int, int], None]


class LoadMeter:
    def __init__(self, total: int, send: Send) -> None:
        self.total = max(0, total)
        self.send = send
        self.done = 0
        self.step = max(MIN_STEP, self.total // REPORTS)
        self.sent = -1

    @classmethod
    def for_file(cls, path: str, send: Send) -> LoadMeter:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0  # the loader says what is wrong with the path
        return cls(size, send)

    def start(self) -> None:
        self._report()

    def add(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.done - self.sent >= self.step or self.done >= self.total:
            self._report()

    def finish(self) -> None:
        """Loaded: the whole file counts (a format may not read every byte of it)."""
        self.done = self.total
        self._report()

    def _report(self) -> None:
        if self.done != self.sent:
            self.sent = self.done
            self.send(self.done, self.total)
