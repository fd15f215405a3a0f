"""The standby section's load and waits: closed-loop client threads keeping every
request's (sent, answered, ok), and waiting on poold's status for a standby or a ready
worker."""

from __future__ import annotations

import threading
import time
from typing import Any


class Clients:
    """``n`` closed-loop client threads; every request's (sent, answered, ok) kept."""

    def __init__(self, frontend: str, model: str, n: int, hidden: int) -> None:
        import numpy as np

        self.frontend, self.model = frontend, model
        self.x = np.full((1, hidden), 0.01, np.float32)
        self.done: list[tuple[float, float, bool]] = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        from router.client import Client
        from router.errors import PoolError

        with Client(self.frontend, timeout=60.0, retries=1) as c:
            while not self.stop_flag.is_set():
                t0 = time.monotonic()
                try:
                    c.infer(self.model, self.x)
                    ok = True
                except PoolError:
                    ok = False
                with self.lock:
                    self.done.append((t0, time.monotonic(), ok))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(90)

    def wait_answers(self, n: int, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        start = len(self.done)
        while len(self.done) < start + n:
            if time.monotonic() > end:
                raise TimeoutError(f"fewer than {n} answers in {timeout:.0f}s")
            time.sleep(0.01)

    def window(self, t0: float, t1: float) -> tuple[float, int, int]:
        """(worst latency, requests, failed) of the requests in flight during [t0, t1]."""
        with self.lock:
            rows = [r for r in self.done if r[1] >= t0 and r[0] <= t1]
        worst = max((b - a for a, b, _ in rows), default=0.0)
        return worst, len(rows), sum(not ok for _, _, ok in rows)

    def where(self, t0: float, t1: float) -> str:
        """Where the worst request of [t0, t1] sat, against the longest time in which no
        client got an answer: equal when every client waited on the same hold."""
        with self.lock:
            rows = sorted(r for r in self.done if r[1] >= t0 and r[0] <= t1)
        if not rows:
            return ""
        a, b, _ = max(rows, key=lambda r: r[1] - r[0])
        ends = sorted(r[1] for r in rows)
        gap, gap_at = max((y - x, x) for x, y in zip(ends, ends[1:], strict=False)) \
            if len(ends) > 1 else (0.0, t0)
        slow = sum(1 for r in rows if r[1] - r[0] > 0.1)
        return (f"worst sent +{a - t0:.3f}s answered +{b - t0:.3f}s; longest time with no "
                f"answer {gap:.3f}s from +{gap_at - t0:.3f}s; {slow} requests over 0.1 s")

    def first_answer_after(self, t: float, timeout: float = 60.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                after = [b for _, b, ok in self.done if ok and b > t]
            if after:
                return min(after) - t
            time.sleep(0.001)
        raise TimeoutError("no answer after the kill")


def wait_standby(pool: Any, device: str, timeout: float = 60.0) -> int:
    """The pid of the device's standby once it waits (and, with a preload of the serving
    version, once that has been read: pool.preload)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for sb in pool.ctl("status")["data"].get("standby", {}).get("standbys", []):
            pre = sb.get("preload") or {}
            if sb["device"] == device and sb["state"] == "waiting" and \
                    pre.get("state") != "loading":
                return int(sb["pid"])
        time.sleep(0.05)
    raise TimeoutError(f"no standby waiting on {device} after {timeout:.0f}s")


def wait_serving(pool: Any, old_pid: int | None = None, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = pool.ctl("status")["data"]["models"][0]
        ready = [w["pid"] for w in m["workers"] if w["state"] == "ready"]
        if ready and ready[0] != old_pid:
            return int(ready[0])
        time.sleep(0.02)
    raise TimeoutError("no ready worker")
