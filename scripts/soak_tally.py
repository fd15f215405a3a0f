"""What every part of a soak reports into, from its own thread: answers by code, event
counts, the first problems, and the flag that stops them all."""

from __future__ import annotations

import threading
from collections import Counter


class Tally:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.codes: Counter[str] = Counter()  # OK, error codes, LOST, WRONG
        self.problems: list[str] = []
        self.counts: Counter[str] = Counter()  # kills, fuzz, slow reader, upgrades ...

    def note(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def answer(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)
