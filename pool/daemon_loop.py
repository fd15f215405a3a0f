"""poold's event loop: one thread that routes, supervises and answers pool-ctl.

Each turn: the router pumps (requests and worker messages move in C; the supervisor's
events come through its callbacks), then the control socket, the door, the spawner's
pipe and the signal pipe are served if they woke it; every TICK_S the supervisor gets a
``Tick``, between ticks a ``Poll``; the metrics are published every PUBLISH_EVERY_S.
Stopping drains first (``shutdown_step``), then answers what still arrives for a short
window (``closing_window``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from pool.events import KillAll, Poll, StopAll, Tick
from workers.heap import freeze_heap

if TYPE_CHECKING:
    from pool.daemon import Daemon

log = logging.getLogger("poold")

TICK_S = 0.05
PUBLISH_EVERY_S = 1.0
CLOSE_QUIET_S = 0.2  # at shutdown: how long the frontend must be quiet before it closes
CLOSE_WINDOW_S = 2.0  # ... and the longest it stays open for that


def run(d: Daemon) -> int:
    """The loop itself, until poold has stopped (0)."""
    wake_r = d.install_signals()
    spawner_fd = d.spawner.fileno()

    def wakeups() -> None:
        # 0: control socket, 1: signal wake-up pipe, 2: the door's monitor,
        # 3: the spawner's pipe (if alive)
        items: list[tuple[zmq.Socket[Any] | None, int]] = [
            (d.control_sock, 0),
            (None, wake_r),
            (d.door.monitor, 0),
        ]
        if spawner_fd is not None:
            items.append((None, spawner_fd))
        d.router.set_wakeups(items)

    wakeups()
    freeze_heap()  # see workers.heap: full collections would pause routing
    next_publish = 0.0
    stopping_since: float | None = None
    while True:
        sched = d.sup.scheduler
        timeout = sched.wake_in_ms(10) if sched.busy() else int(TICK_S * 1000)
        d.router.pump(timeout)
        if d.router.woke(0) or d.signals:
            # The core's clock is the last event's time, and the pump may have waited up
            # to a tick: bring it to now before a command or a reload starts an
            # operation, which times itself on that clock.
            d.feed(Poll(time.monotonic()))
        if d.router.woke(0):
            d.control.handle()
            d.shell.flush()  # what the commands' operations decided
        if d.router.woke(2):
            d.door.handle()
            d.door_stats = d.door.stats()
        if spawner_fd is not None and d.router.woke(3):
            if not d.spawner.handle_readable():
                spawner_fd = None
                wakeups()
        if d.router.woke(1):
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        d.handle_signals()
        d.shell.flush()  # a reload's operations
        now = time.monotonic()
        if now - d.last_tick >= TICK_S:
            d.last_tick = now
            d.router.sweep(now)
            d.feed(Tick(now))
            if d.running:
                d.gateways.tick(now)
            if d.running and d.spawner.maybe_restart(now):
                spawner_fd = d.spawner.fileno()
                wakeups()
            d.systemd(now)
        else:
            d.feed(Poll(now))
        if now >= next_publish:
            next_publish = now + PUBLISH_EVERY_S
            d.publish()
        if not d.running:
            stopping_since = shutdown_step(d, stopping_since, now)
            if stopping_since is not None and stopping_since < 0:
                closing_window(d)
                return 0


def shutdown_step(d: Daemon, since: float | None, now: float) -> float | None:
    """Stop accepting; let in-flight and queued work finish; then stop the workers."""
    if since is None:
        d.notifier.stopping("draining")
        d.router.accepting = False
        d.gateways.stop()  # they finish what is in flight; the router answers it
        return now
    drained = not d.router.inflight_count() and not d.router.queued_count()
    if drained or now - since > d.pool.drain_timeout_s:
        if not d.workers_told:
            d.workers_told = True
            d.feed(StopAll(now))  # the standbys are let go too
        limit = d.pool.drain_timeout_s + d.pool.stop_timeout_s + 10
        if d.sup.all_exited() or now - since > limit:
            d.feed(KillAll(now))
            return -1.0
    return since


def closing_window(d: Daemon) -> None:
    """Answer SHUTTING_DOWN to whatever still arrives until the frontend has been quiet
    for CLOSE_QUIET_S (at most CLOSE_WINDOW_S), then close it at once: a request read
    is a request answered, and one sent after the close stays in the client's queue
    (it is never half-taken)."""
    start = quiet = time.monotonic()
    seen = d.router.frontend_seen
    while True:
        d.router.pump(10)
        now = time.monotonic()
        if d.router.frontend_seen != seen:
            seen, quiet = d.router.frontend_seen, now
        if now - quiet >= CLOSE_QUIET_S or now - start >= CLOSE_WINDOW_S:
            break
    d.door.close()
    d.router.close()  # flushes the last answers (LINGER)
    log.info("frontend closed")
