"""The router: frontend and backend ROUTER sockets, queues, credit, deadlines.

It never decodes tensor bytes and never imports torch. The event loop that calls it is
owned by ``pool.daemon.Daemon``: it calls ``pump``, which runs the C core
(``router/fastlane.c``) until Python has something to do.

Who does what:

* The C core serves every ordinary request from end to end: it reads the client's
  message, checks the header as strictly as ``router.protocol`` does, picks the least
  loaded worker with credit, forwards the frames untouched, and sends the reply back.
  It owns every dispatched request, and counts results per worker for the metrics.
* Python owns the rest, and everything the core "punts" to it: malformed or unknown
  requests (answered with the right error), models whose requests must wait (a queue,
  a failed model, a shutdown), worker events, deadlines, retries after a worker's exit.

Fairness: a model's queue is served round-robin between client connections, and when
it is full a request from a connection holding less of it takes the place of the newest
request of the one holding the most (answered OVERLOADED), so one flooding client cannot
push the others into OVERLOADED or make them wait behind its flood.

The pieces around this class: ``router.sockets`` opens the sockets (and says why each
option is set), ``router.admission`` judges the requests the core punts,
``router.answers`` sends the errors, ``router.stats`` names what goes to the metrics.

The lane (``lane`` below): each worker also connects to a unix SOCK_SEQPACKET socket of
ours, and the C core sends small requests down it: the worker's loop is then woken by one
sendmsg(2) instead of two libzmq I/O threads in turn (see "the lane" in
``router/fastlane.c``). Replies may come either way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import zmq

from router import fastlane as fl
from router import protocol as p
from router.admission import Refused, admit, split_envelope
from router.answers import Answers, unread_error
from router.frames import NOBLOCK, send_frames
from router.sockets import listen_lane, open_backend, open_frontend
from router.stats import (
    DEFAULT_BOUNDS,
    STATUS_CODES,
    BulkObserver,
    RejectionObserver,
    RequestObserver,
    code_counts,
)
from router.table import ModelRoute, WorkerSlot

# Names other modules import from here.
__all__ = [
    "DEFAULT_BOUNDS",
    "STATUS_CODES",
    "BulkObserver",
    "RejectionObserver",
    "RequestObserver",
    "Router",
    "RouterEvents",
    "unread_error",
]

log = logging.getLogger(__name__)

TRIM_EVERY_S = 5.0  # malloc_trim, on its own thread


class RouterEvents(Protocol):
    """What the supervisor hears from the router."""

    def on_worker_event(self, wid: bytes, event: dict[str, Any]) -> None: ...
    def on_worker_unreachable(self, wid: bytes) -> None: ...
    def on_worker_overdue(self, slot: WorkerSlot) -> None: ...


class Router:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        frontend: str,
        backend: str,
        events: RouterEvents,
        *,
        max_message_bytes: int = 1 << 30,
        request_grace_s: float = 5.0,
        observe: RequestObserver | None = None,
        observe_bulk: BulkObserver | None = None,
        latency_bounds: Sequence[float] = DEFAULT_BOUNDS,
        curve_secret_key: bytes | None = None,
        spin_us: int = 0,
        lane: str = "",
        max_unread_bytes: int = 64 << 20,
        max_unread_total_bytes: int = 1 << 30,
        observe_rejected: RejectionObserver | None = None,
    ) -> None:
        self.events = events
        self.request_grace_s = request_grace_s
        self.observe_bulk = observe_bulk
        self.observe_rejected = observe_rejected
        self.spin_us = spin_us
        self.routes: dict[str, ModelRoute] = {}
        self.workers: dict[bytes, WorkerSlot] = {}
        self.accepting = True
        self.frontend_seen = 0  # client messages Python has read (the closing window watches it)
        self.closed = False
        self._route_at: dict[int, ModelRoute] = {}
        self._slot_at: dict[int, WorkerSlot] = {}

        self.frontend = open_frontend(
            ctx, frontend, max_message_bytes=max_message_bytes, curve_secret_key=curve_secret_key
        )
        self.backend = open_backend(ctx, backend)
        self.core = fl.Core(self.frontend, self.backend, STATUS_CODES, latency_bounds)
        self.answers = Answers(self.core, self.frontend, observe, self._route_at, self._slot_at)
        self.core.set_reply_limits(
            max_unread_bytes,
            max_unread_total_bytes,
            unread_error(max_unread_bytes, max_unread_total_bytes),
        )
        self._trim_stop = threading.Event()
        self._trimmer = threading.Thread(target=self._trim, name="gpupool-trim", daemon=True)
        self._trimmer.start()
        self.lane = lane  # "" without lanes
        if lane:
            # The workers' lanes connect here; the C core accepts and owns them.
            self.core.lane_listen(listen_lane(lane))

    # ----------------------------------------------------------------- table edits
    def add_route(self, route: ModelRoute) -> None:
        route.index = self.core.model_add(route.name)
        route.pushed = ()
        self.routes[route.name] = route
        self._route_at[route.index] = route
        self._push(route)

    def remove_route(self, name: str) -> None:
        route = self.routes.pop(name, None)
        if route is not None:
            self.core.model_remove(route.index)
            self._route_at.pop(route.index, None)

    def add_worker(self, slot: WorkerSlot) -> None:
        route = self.routes[slot.model]
        slot.index = self.core.worker_add(slot.wid, route.index, slot.credit, slot.version)
        slot.core = self.core
        self.workers[slot.wid] = slot
        self._slot_at[slot.index] = slot

    def activate(self, model: str, generation: int, slots: list[WorkerSlot]) -> None:
        """Make ``slots`` the only workers that get new requests for ``model``: one step."""
        route = self.routes[model]
        route.generation = generation
        route.active = list(slots)
        self._push(route)
        self.core.kick(route.index)  # what waited (a drain-first upgrade) goes out now

    def deactivate(self, slot: WorkerSlot) -> None:
        """Stop sending new requests to one worker (it keeps what it holds)."""
        route = self.routes.get(slot.model)
        if route is not None and slot in route.active:
            route.active = [s for s in route.active if s is not slot]
            self._push(route)

    def _push(self, route: ModelRoute) -> None:
        """Tell the C core what changed about a route (cheap when nothing did)."""
        state = (
            tuple(s.index for s in route.active),
            self.accepting and route.unavailable is None,
            route.retry,
            route.timeout_s,
            route.max_queue,
        )
        if state == route.pushed:
            return
        if not route.pushed or state[0] != route.pushed[0]:
            self.core.model_set_active(route.index, state[0])
        if not route.pushed or state[4] != route.pushed[4]:
            message = f"model {route.name!r} has {route.max_queue} requests waiting (max_queue)"
            self.core.model_set_full_error(route.index, p.error_map(p.OVERLOADED, message))
        self.core.model_set(route.index, state[1], route.retry, route.timeout_s, route.max_queue)
        route.pushed = state

    def remove_worker(self, wid: bytes, *, lost: bool) -> int:
        """Forget a worker. Its in-flight requests are retried once or answered WORKER_LOST."""
        slot = self.workers.pop(wid, None)
        if slot is None:
            return 0
        self.deactivate(slot)
        core = self.core
        held = slot.load
        why = "the worker exited" if lost else "the worker was stopped"
        gone = core.worker_drop(slot.index)  # the retryable ones are queued again
        self.answers.fail(gone, p.WORKER_LOST, f"{why} while computing this request", forget=True)
        self._flush_worker(slot)
        slot.final_served = slot.served
        slot.core = None
        core.worker_remove(slot.index)
        self._slot_at.pop(slot.index, None)
        route = self.routes.get(slot.model)
        if route is not None:
            core.kick(route.index)
        return held

    # ------------------------------------------------------------------- the loop
    def set_wakeups(self, items: Sequence[tuple[zmq.Socket[Any] | None, int]]) -> None:
        """Other sockets or file descriptors that should end ``pump`` when readable."""
        self.core.set_extra(items)

    def woke(self, i: int) -> bool:
        """Whether wake-up item ``i`` was readable when ``pump`` last returned."""
        return self.core.extra_ready(i)

    def pump(self, timeout_ms: int) -> None:
        """Serve requests in C until Python has work, or ``timeout_ms`` passes."""
        for route in self.routes.values():
            self._push(route)  # the supervisor may have changed a route since last time
        flags = self.core.run(timeout_ms, self.spin_us)
        if flags & p.RUN_ERROR:
            log.error("router poll failed: %s", zmq.strerror(zmq.zmq_errno()))
            time.sleep(0.01)  # never spin on a persistent error
        if flags & p.RUN_PUNTS:
            self._handle_punts()
        if flags & p.RUN_EXPIRED:
            self.sweep(time.monotonic())

    def _handle_punts(self) -> None:
        now = time.monotonic()
        for kind, index, frames in self.core.punts():
            if kind == p.PUNT_FRONTEND:
                self._accept(frames, now)
            elif kind == p.PUNT_BACKEND:
                self._backend_message(frames)
            elif kind == p.PUNT_UNREACHABLE:
                slot = self._slot_at.get(index)
                if slot is not None:
                    self._unreachable(slot)

    def _unreachable(self, slot: WorkerSlot) -> None:
        # EHOSTUNREACH (ROUTER_MANDATORY): the worker is gone. Re-route what it held.
        log.warning("worker %s unreachable; re-routing its requests", slot.wid)
        self.remove_worker(slot.wid, lost=True)
        self.events.on_worker_unreachable(slot.wid)

    # ------------------------------------------------------------------- frontend
    def _accept(self, frames: list[bytes], now: float) -> None:
        self.frontend_seen += 1
        envelope, body = split_envelope(frames)
        decision = admit(body, self.routes, self.accepting, lambda r: self.core.queued(r.index))
        if isinstance(decision, Refused):
            self.answers.refuse(envelope, decision.model, decision.code, decision.header)
            return
        index = decision.route.index
        self.core.enqueue(index, envelope, decision.body, now, now + decision.timeout_s)
        self.core.kick(index)

    def _backend_message(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[1] != p.KIND_EVENT:
            return  # a short reply or an unknown kind: nothing to act on
        wid = frames[0]
        try:
            event = p.unpack_map(frames[2])
        except p.ProtocolError:
            log.warning("undecodable event from worker %r", wid)
            return
        self.events.on_worker_event(wid, event)

    # ------------------------------------------------------------------ deadlines
    def sweep(self, now: float) -> None:
        """Expire requests past their deadline; report workers past deadline+grace."""
        queued, held, overdue = self.core.sweep(now, self.request_grace_s)
        why = "waited in the queue past its deadline"
        self.answers.fail(queued, p.DEADLINE_EXCEEDED, why, forget=True, now=now)
        # The client gets its answer at the deadline, not later; the worker's late reply
        # is dropped, and the worker counts as hung if it never sends one.
        why = "the model did not answer before the deadline"
        self.answers.fail(held, p.DEADLINE_EXCEEDED, why, forget=False, now=now)
        for key in overdue:
            info = self.core.info(key)
            if info is None:
                continue
            slot = self._slot_at.get(info.worker)
            self.core.forget(key)
            if slot is not None:
                self.events.on_worker_overdue(slot)

    def fail_queued(self, model: str, code: str, message: str) -> int:
        """Answer every queued request of ``model`` with an error (a model marked failed)."""
        route = self.routes[model]
        keys = self.core.queue_take(route.index)
        self.answers.fail(keys, code, message, forget=True)
        return len(keys)

    # ------------------------------------------------------------------ metrics
    def flush_stats(self) -> None:
        """Hand the C core's per-worker request counts to ``observe_bulk``, and the
        OVERLOADED answers it gave itself to ``observe_rejected``."""
        for slot in self.workers.values():
            self._flush_worker(slot)
        for route in self.routes.values():
            n = sum(self.core.model_rejections(route.index))
            if n and self.observe_rejected is not None:
                self.observe_rejected(route.name, p.OVERLOADED, n)

    def peer_closed(self, fd: int) -> None:
        """A frontend connection closed (``router.door``'s monitor): the requests its
        client still has queued are dropped, nobody is left to answer."""
        self.core.peer_closed(fd)

    def peer_stats(self) -> fl.PeerStats:
        """The client connections holding requests or unread replies (forgets the rest)."""
        return self.core.peer_stats()

    def _trim(self) -> None:
        """Every ``TRIM_EVERY_S``, hand the allocator's free pages back to the kernel
        (``Core.trim``): what a client that left held is freed, but glibc would keep it.
        On a thread of its own, GIL released: releasing tens of MiB takes ~10 ms of
        madvise calls, which the loop must not wait for."""
        while not self._trim_stop.wait(TRIM_EVERY_S):
            self.core.trim()

    def _flush_worker(self, slot: WorkerSlot) -> None:
        n, codes, hists, sums = self.core.worker_stats(slot.index)
        if not n or self.observe_bulk is None:
            return
        self.observe_bulk(slot.model, slot.version, code_counts(codes), hists, sums)

    # ------------------------------------------------------------------ snapshots
    @property
    def dropped_replies(self) -> int:
        """Replies nobody could receive: late after a deadline, or the client had left."""
        return self.answers.dropped + self.core.dropped_replies()

    def inflight_count(self) -> int:
        return self.core.live()

    def queued_count(self) -> int:
        return sum(self.core.queued(r.index) for r in self.routes.values())

    def queue_len(self, model: str) -> int:
        route = self.routes.get(model)
        return self.core.queued(route.index) if route is not None else 0

    def send_control(self, wid: bytes, message: bytes) -> bool:
        try:
            send_frames(self.backend, [wid, p.KIND_CONTROL, message], NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._trim_stop.set()
        self._trimmer.join(5)
        self.core.close()
        if self.lane:
            try:
                os.unlink(self.lane)
            except OSError:
                pass
        self.frontend.close(linger=1000)
        self.backend.close(linger=0)
