"""An asyncio loop that busy-polls its descriptors for a while before it sleeps.

With one request in flight, a gateway is idle twice per request: while the router and
the worker compute (until the router's reply comes), and while the client reads the
answer and writes its next request. Each time its loop sleeps in ``epoll_wait`` and is
woken by the kernel when bytes arrive, and on a virtual machine's idle core that wake-up
costs tens to a hundred microseconds, more than the gateway's own work. The router
already spins for the same reason (``router_spin_us``).

``SpinningSelector`` asks epoll with a zero timeout until something is ready or the
spin window (``spin_us``) is over, and only then blocks for the rest of the loop's
timeout. It spins over every descriptor the loop watches (the router link, each client
connection, the listener, grpc's wake-up socket), not one of them: an earlier
prototype that polled only the router link delayed the client's next request by up to
its window (docs/PERFORMANCE.md, the gateway spin experiment). Between polls it calls
``sched_yield``, so on a core other processes want it gives way at once instead of
holding the core for its window.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import time
from typing import Any


class SpinningSelector(selectors.EpollSelector):
    def __init__(self, spin_us: int) -> None:
        super().__init__()
        self.spin_s = spin_us / 1e6
        self.spins = 0  # how many times the loop went idle and spun
        self.caught = 0  # of those, how many found an event before the window ended

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)  # the loop has work: never spin then
        start = time.monotonic()
        window = self.spin_s if timeout is None else min(self.spin_s, timeout)
        end = start + window
        self.spins += 1
        while True:
            ready = super().select(0)
            if ready:
                self.caught += 1
                return ready
            if time.monotonic() >= end:
                break
            os.sched_yield()
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - start))
        return super().select(timeout)


def spinning_loop_factory(spin_us: int) -> Any:
    """A loop factory for ``asyncio.Runner``: a selector loop on a ``SpinningSelector``."""

    def new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(SpinningSelector(spin_us))

    return new_loop
