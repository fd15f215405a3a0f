"""Restart-storm guard: attempts within a window, growing back-off, then give up."""

from __future__ import annotations

import time
from collections import deque


class FlapGuard:
    def __init__(
        self,
        attempts: int = 5,
        window_s: float = 120.0,
        base_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
    ) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.failures: deque[float] = deque()

    def failure(self, now: float | None = None) -> float | None:
        """Record a failure. Returns the delay before the next try, or None to give up."""
        now = time.monotonic() if now is None else now
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window_s:
            self.failures.popleft()
        n = len(self.failures)
        if n >= self.attempts:
            return None
        return min(self.max_delay_s, self.base_delay_s * 2 ** (n - 1))

    def reset(self) -> None:
        self.failures.clear()
