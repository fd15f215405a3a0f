"""The router: frontend and backend ROUTER sockets, queues, credit, deadlines.

It never decodes tensor bytes and never imports torch. The event loop that calls it is
owned by ``pool.daemon.Daemon``; the router exposes handlers for its two sockets and a
``sweep`` for time-driven work (deadlines).

Socket options, chosen on purpose:

* ROUTER_MANDATORY on the backend: a send to a worker that vanished raises
  EHOSTUNREACH instead of dropping the request silently, so we can re-route it.
  Not on the frontend: a client that left cannot be answered anyway.
* High-water marks are generous (our own per-model queues are the bound that matters and
  they answer OVERLOADED); a ZeroMQ HWM would drop or block without telling anyone.
* MAXMSGSIZE on the frontend caps what one client message may make libzmq allocate.
* LINGER is short so a stopping daemon flushes its last replies without hanging forever.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from itertools import count
from typing import Any, Protocol

import zmq

from router import protocol as p
from router.frames import NOBLOCK, recv_frames, send_frames
from router.table import ModelRoute, Request, WorkerSlot

log = logging.getLogger(__name__)

DRAIN_BATCH = 512  # messages handled per socket per wake-up, so no socket starves another
_pack_key = struct.Struct("<Q").pack


class RouterEvents(Protocol):
    """What the supervisor hears from the router."""

    def on_worker_event(self, wid: bytes, event: dict[str, Any]) -> None: ...
    def on_worker_unreachable(self, wid: bytes) -> None: ...
    def on_worker_overdue(self, slot: WorkerSlot, request: Request) -> None: ...


RequestObserver = Callable[[str, str, str, float, float, float], None]


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
        curve_secret_key: bytes | None = None,
    ) -> None:
        self.events = events
        self.request_grace_s = request_grace_s
        self.observe = observe
        self.routes: dict[str, ModelRoute] = {}
        self.workers: dict[bytes, WorkerSlot] = {}
        self.accepting = True
        self._keys = count(1)
        self._inflight: dict[bytes, Request] = {}
        self.dropped_replies = 0

        self.frontend = ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.frontend.setsockopt(zmq.RCVHWM, 100_000)
        self.frontend.setsockopt(zmq.SNDHWM, 100_000)
        self.frontend.setsockopt(zmq.LINGER, 1000)
        if curve_secret_key is not None:
            self.frontend.curve_server = True
            self.frontend.curve_secretkey = curve_secret_key
        self.frontend.bind(frontend)

        self.backend = ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.backend.setsockopt(zmq.RCVHWM, 100_000)
        self.backend.setsockopt(zmq.SNDHWM, 100_000)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.bind(backend)

    # ----------------------------------------------------------------- table edits
    def add_route(self, route: ModelRoute) -> None:
        self.routes[route.name] = route

    def add_worker(self, slot: WorkerSlot) -> None:
        self.workers[slot.wid] = slot

    def activate(self, model: str, generation: int, slots: list[WorkerSlot]) -> None:
        """Make ``slots`` the only workers that get new requests for ``model``: one step."""
        route = self.routes[model]
        route.generation = generation
        route.active = slots
        self.dispatch(route)

    def deactivate(self, slot: WorkerSlot) -> None:
        """Stop sending new requests to one worker (it keeps what it holds)."""
        route = self.routes.get(slot.model)
        if route is not None and slot in route.active:
            route.active = [s for s in route.active if s is not slot]

    def remove_worker(self, wid: bytes, *, lost: bool) -> int:
        """Forget a worker. Its in-flight requests are retried once or answered WORKER_LOST."""
        slot = self.workers.pop(wid, None)
        if slot is None:
            return 0
        self.deactivate(slot)
        pending = list(slot.inflight.values())
        slot.inflight.clear()
        route = self.routes.get(slot.model)
        for req in pending:
            self._inflight.pop(req.key, None)
            req.worker = None
            if req.answered:
                continue
            if route is not None and route.retry and req.attempts < 2:
                route.queue.appendleft(req)  # first in line: it has waited longest
            else:
                why = "the worker exited" if lost else "the worker was stopped"
                self._reply_error(req, p.WORKER_LOST, f"{why} while computing this request")
        if route is not None and pending:
            self.dispatch(route)
        return len(pending)

    # ------------------------------------------------------------------- frontend
    def handle_frontend(self) -> None:
        sock = self.frontend
        now = time.monotonic()
        for _ in range(DRAIN_BATCH):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            self._accept(frames, now)

    def _accept(self, frames: list[Any], now: float) -> None:
        # Envelope: identity, then the empty delimiter REQ sockets add. A DEALER client
        # that skips the delimiter is served too (its next frame is the protocol id).
        if len(frames) >= 2 and len(frames[1]) == 0:
            envelope, body = frames[:2], frames[2:]
        else:
            envelope, body = frames[:1], frames[1:]
        try:
            if len(body) < 2:
                raise p.ProtocolError(p.BAD_REQUEST, "expected protocol id and header frames")
            p.check_protocol(body[0].bytes)
            header = p.unpack_map(body[1].buffer)
            model, timeout_ms, client_id = p.route_fields(header)
        except p.ProtocolError as exc:
            self._reject("", exc.code)
            self._send_client(envelope, p.error_header(exc.code, exc.message))
            return
        route = self.routes.get(model)
        if route is None:
            self._reject("", p.NO_SUCH_MODEL)  # not the name: clients choose it (cardinality)
            msg = f"no model named {model!r}; serving: {', '.join(sorted(self.routes)) or 'none'}"
            self._send_client(envelope, p.error_header(p.NO_SUCH_MODEL, msg, rid=client_id))
            return
        if not self.accepting:
            self._reject(model, p.SHUTTING_DOWN)
            self._send_client(
                envelope,
                p.error_header(
                    p.SHUTTING_DOWN, "the pool is shutting down", model=model, rid=client_id
                ),
            )
            return
        if route.unavailable is not None:
            self._reject(model, p.MODEL_UNAVAILABLE)
            self._send_client(
                envelope,
                p.error_header(p.MODEL_UNAVAILABLE, route.unavailable, model=model, rid=client_id),
            )
            return
        timeout = timeout_ms / 1000.0 if timeout_ms else route.timeout_s
        req = Request(
            _pack_key(next(self._keys)), envelope, body[1:], model, client_id, now, now + timeout
        )
        worker = self._pick(route)
        if worker is not None and not route.queue:
            self._send_worker(worker, req, now)
        elif len(route.queue) >= route.max_queue:
            self.observe_done(req, p.OVERLOADED, None, now)
            self._send_client(
                envelope,
                p.error_header(
                    p.OVERLOADED,
                    f"model {model!r} has {len(route.queue)} requests waiting (max_queue)",
                    model=model,
                    rid=client_id,
                ),
            )
        else:
            route.queue.append(req)
            if worker is not None:
                self.dispatch(route)

    def _reject(self, model: str, code: str) -> None:
        if self.observe is not None:
            self.observe(model, "", code, 0.0, 0.0, 0.0)

    @staticmethod
    def _pick(route: ModelRoute) -> WorkerSlot | None:
        best: WorkerSlot | None = None
        best_load = 1 << 30
        for slot in route.active:
            load = len(slot.inflight)
            if load < slot.credit and load < best_load:
                best, best_load = slot, load
        return best

    def dispatch(self, route: ModelRoute) -> None:
        """Move queued requests to workers with free credit, oldest first."""
        queue = route.queue
        now = time.monotonic()
        while queue:
            worker = self._pick(route)
            if worker is None:
                return
            req = queue.popleft()
            if req.deadline <= now:
                self._expire(req, now, "waited in the queue past its deadline")
                continue
            self._send_worker(worker, req, now)

    def _send_worker(self, worker: WorkerSlot, req: Request, now: float) -> None:
        req.attempts += 1
        req.worker = worker
        req.dispatched = now
        worker.inflight[req.key] = req
        self._inflight[req.key] = req
        try:
            send_frames(self.backend, [worker.wid, p.KIND_REQUEST, req.key, *req.frames])
        except zmq.ZMQError as exc:
            # EHOSTUNREACH (ROUTER_MANDATORY): the worker is gone. Re-route what it held.
            log.warning("worker %s unreachable (%s); re-routing its requests", worker.wid, exc)
            self.remove_worker(worker.wid, lost=True)
            self.events.on_worker_unreachable(worker.wid)

    # -------------------------------------------------------------------- backend
    def handle_backend(self) -> None:
        sock = self.backend
        for _ in range(DRAIN_BATCH):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            kind = frames[1].bytes
            if kind == p.KIND_REQUEST and len(frames) >= 5:
                self._complete(frames)
            elif kind == p.KIND_EVENT and len(frames) >= 3:
                wid = frames[0].bytes
                try:
                    event = p.unpack_map(frames[2].buffer)
                except p.ProtocolError:
                    log.warning("undecodable event from worker %r", wid)
                    continue
                self.events.on_worker_event(wid, event)

    def _complete(self, frames: list[Any]) -> None:
        # frames: wid, b"R", key, status, reply header, *output buffers
        req = self._inflight.pop(frames[2].bytes, None)
        if req is None:
            self.dropped_replies += 1  # answered already (deadline) or its worker was dropped
            return
        worker = req.worker
        if worker is not None:
            worker.inflight.pop(req.key, None)
            worker.served += 1
        if req.answered:
            self.dropped_replies += 1  # too late: the client has its DEADLINE_EXCEEDED
            return
        now = time.monotonic()
        self.observe_done(req, frames[3].bytes.decode("ascii", "replace"), worker, now)
        self._send_client(req.envelope, frames[4], frames[5:])
        if worker is not None:
            route = self.routes.get(worker.model)
            if route is not None and route.queue:
                self.dispatch(route)

    # ------------------------------------------------------------------ deadlines
    def sweep(self, now: float) -> None:
        """Expire queued requests past their deadline; report workers past deadline+grace."""
        for route in self.routes.values():
            if route.queue and any(r.deadline <= now for r in route.queue):
                keep = [r for r in route.queue if r.deadline > now]
                for r in route.queue:
                    if r.deadline <= now:
                        self._expire(r, now, "waited in the queue past its deadline")
                route.queue.clear()
                route.queue.extend(keep)
        overdue = []
        for req in self._inflight.values():
            if req.deadline > now:
                continue
            if not req.answered:
                req.answered = True  # the client gets its answer at the deadline, not later
                self._expire(req, now, "the model did not answer before the deadline")
            elif req.deadline + self.request_grace_s <= now:
                overdue.append(req)
        for req in overdue:
            worker = req.worker
            self._inflight.pop(req.key, None)
            if worker is not None:
                worker.inflight.pop(req.key, None)
                self.events.on_worker_overdue(worker, req)

    def _expire(self, req: Request, now: float, why: str) -> None:
        self._reply_error(req, p.DEADLINE_EXCEEDED, why, now)

    def fail_queued(self, model: str, code: str, message: str) -> int:
        """Answer every queued request of ``model`` with an error (a model marked failed)."""
        route = self.routes[model]
        n = len(route.queue)
        while route.queue:
            self._reply_error(route.queue.popleft(), code, message)
        return n

    # -------------------------------------------------------------------- replies
    def _reply_error(self, req: Request, code: str, message: str, now: float = 0.0) -> None:
        self.observe_done(req, code, req.worker, now or time.monotonic())
        self._send_client(
            req.envelope, p.error_header(code, message, model=req.model, rid=req.client_id)
        )

    def observe_done(self, req: Request, code: str, worker: WorkerSlot | None, now: float) -> None:
        if self.observe is None:
            return
        version = worker.version if worker is not None else ""
        started = req.dispatched or now
        self.observe(
            req.model, version, code, started - req.arrived, now - started, now - req.arrived
        )

    def _send_client(
        self, envelope: list[Any], header: Any, buffers: list[Any] | None = None
    ) -> None:
        try:
            send_frames(self.frontend, [*envelope, p.PROTOCOL, header, *(buffers or ())], NOBLOCK)
        except zmq.ZMQError as exc:
            self.dropped_replies += 1
            log.debug("reply not delivered: %s", exc)

    # ------------------------------------------------------------------ snapshots
    def inflight_count(self) -> int:
        return len(self._inflight)

    def queued_count(self) -> int:
        return sum(len(r.queue) for r in self.routes.values())

    def send_control(self, wid: bytes, message: bytes) -> bool:
        try:
            send_frames(self.backend, [wid, p.KIND_CONTROL, message], NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        self.frontend.close(linger=1000)
        self.backend.close(linger=0)
