"""The router and its C core, driven in one process with fake workers (no torch, no poold).

Each test builds a Router on ipc sockets, plays the workers with DEALER sockets whose
identities are the worker ids, and plays clients with DEALER sockets (an empty delimiter
frame, as REQ adds). That reaches every path of router/fastlane.c: the fast path, the
queue, OVERLOADED, deadlines in the queue and at a worker, late replies, worker loss
with and without retry, an unreachable worker, and punted messages. The last test is a
randomised soak whose invariant is "every request gets exactly one answer"; run it
under AddressSanitizer with scripts/asan_router.sh.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from router import fastlane
from router import protocol as p
from router.door import Door
from router.router import DEFAULT_BOUNDS, Router
from router.table import ModelRoute, WorkerSlot
from workers.lane import Lane

pytestmark = pytest.mark.skipif(not fastlane.available(), reason="router/_fastlane not built")


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[bytes, dict[str, Any]]] = []
        self.unreachable: list[bytes] = []
        self.overdue: list[bytes] = []

    def on_worker_event(self, wid: bytes, event: dict[str, Any]) -> None:
        self.events.append((wid, event))

    def on_worker_unreachable(self, wid: bytes) -> None:
        self.unreachable.append(wid)

    def on_worker_overdue(self, slot: WorkerSlot) -> None:
        self.overdue.append(slot.wid)


class Rig:
    """A router and its fake workers; with ``lanes``, each worker also connects a lane
    (``workers.lane``) and ``take``/``reply`` use whichever way a request came."""

    def __init__(self, tmp: str, ctx: zmq.Context[Any], lanes: bool = False) -> None:
        self.ctx = ctx
        self.front = f"ipc://{tmp}/front.sock"
        self.back = f"ipc://{tmp}/back.sock"
        self.lane_path = f"{tmp}/lane.sock"
        self.events = Events()
        self.observed: list[tuple[str, ...]] = []
        self.bulk: list[dict[str, int]] = []
        self.hists: list[tuple[list[list[int]], list[float]]] = []
        self.router = Router(
            ctx,
            self.front,
            self.back,
            self.events,
            request_grace_s=0.2,
            observe=lambda *a: self.observed.append(tuple(str(x) for x in a[:3])),
            observe_bulk=self._bulk,
            lane=self.lane_path if lanes else "",
        )
        self.lanes_on = lanes
        self.lanes: dict[bytes, Lane] = {}
        self.by_lane: set[bytes] = set()  # keys of requests that came down a lane
        self.workers: dict[bytes, zmq.Socket[Any]] = {}
        self.clients: list[zmq.Socket[Any]] = []

    def _bulk(
        self, model: str, version: str, counts: dict[str, int], h: list[list[int]], s: list[float]
    ) -> None:
        self.bulk.append(counts)
        self.hists.append((h, s))

    def route(
        self, name: str, max_queue: int = 100, timeout_s: float = 30.0, retry: bool = True
    ) -> ModelRoute:
        r = ModelRoute(name, max_queue, timeout_s, retry)
        self.router.add_route(r)
        return r

    def worker(self, wid: bytes, model: str, credit: int = 2) -> WorkerSlot:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, wid)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.back)
        self.workers[wid] = sock
        sock.send_multipart([p.KIND_EVENT, msgpack.packb({"t": "hello"})])
        slot = WorkerSlot(wid, model, 1, "v1", credit)
        self.router.add_worker(slot)
        self.pump_until(lambda: any(w == wid for w, _ in self.events.events))
        if self.lanes_on:
            lane = Lane.connect(self.lane_path, wid.decode())
            assert lane is not None
            self.lanes[wid] = lane
            self.pump_until(lambda: self.router.core.worker_has_lane(slot.index))
        return slot

    def poll_worker(self, wid: bytes) -> list[bytes] | None:
        """What worker ``wid`` has waiting, from its lane first, without pumping."""
        lane = self.lanes.get(wid)
        if lane is not None:
            frames = lane.recv()
            if frames is not None:
                req = [f.bytes for f in frames]
                self.by_lane.add(req[1])
                return req
        sock = self.workers[wid]
        return sock.recv_multipart() if sock.poll(0) else None

    def client(self) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.front)
        self.clients.append(sock)
        return sock

    def pump(self, ms: int = 5) -> None:
        self.router.pump(ms)

    def pump_until(self, cond: Any, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "timed out"
            self.pump(5)

    def take(self, wid: bytes, timeout: float = 5.0) -> list[bytes]:
        """Pump until worker ``wid`` receives a request; return [b"R", key, header, ...]."""
        end = time.monotonic() + timeout
        while (req := self.poll_worker(wid)) is None:
            assert time.monotonic() < end, f"{wid!r} got nothing"
            self.pump(5)
        return req

    def reply(
        self, wid: bytes, req: list[bytes], status: bytes = b"OK", backend: bool = False
    ) -> None:
        """Answer the way the request came, or on the backend socket (``backend``)."""
        rid = msgpack.unpackb(req[2]).get("id")
        header = msgpack.packb({"ok": status == b"OK", "model": "m", "version": "v1", "id": rid})
        frames = [p.KIND_REQUEST, req[1], status, header, req[3]]
        lane = self.lanes.get(wid)
        if req[1] in self.by_lane and not backend and lane is not None:
            self.by_lane.discard(req[1])
            assert lane.send(frames)
            return
        self.workers[wid].send_multipart(frames)

    def answer(
        self, client: zmq.Socket[Any], timeout: float = 5.0
    ) -> tuple[dict[str, Any], list[bytes]]:
        end = time.monotonic() + timeout
        while not client.poll(0):
            assert time.monotonic() < end, "client got no answer"
            self.pump(5)
        frames = client.recv_multipart()
        assert frames[0] == b"" and frames[1] == p.PROTOCOL
        return msgpack.unpackb(frames[2]), frames[3:]

    def close(self) -> None:
        self.router.close()
        for s in [*self.workers.values(), *self.clients]:
            s.close(0)
        for lane in self.lanes.values():
            lane.close()


def send(client: zmq.Socket[Any], model: str, payload: bytes = b"x" * 16, **extra: Any) -> None:
    header = {"model": model, "inputs": [{"dtype": "uint8", "shape": [len(payload)]}], **extra}
    client.send_multipart([b"", p.PROTOCOL, msgpack.packb(header), payload])


@pytest.fixture
def rig(tmp_path: Any, request: Any) -> Iterator[Rig]:
    ctx: zmq.Context[Any] = zmq.Context()
    r = Rig(str(tmp_path), ctx, getattr(request, "param", False))
    try:
        yield r
    finally:
        r.close()
        ctx.term()


def test_fast_path_forwards_frames_untouched_and_counts_the_reply(rig: Rig) -> None:
    rig.route("m")
    slot = rig.worker(b"w1", "m")
    rig.router.activate("m", 1, [slot])
    c = rig.client()
    send(c, "m", b"\x00\xffabc", id="r1")
    req = rig.take(b"w1")
    assert req[0] == p.KIND_REQUEST and len(req[1]) == 8
    assert msgpack.unpackb(req[2])["id"] == "r1" and req[3] == b"\x00\xffabc"
    assert slot.load == 1
    rig.reply(b"w1", req)
    header, buffers = rig.answer(c)
    assert header["ok"] and buffers == [b"\x00\xffabc"]
    assert slot.load == 0 and slot.served == 1
    rig.router.flush_stats()
    assert rig.bulk == [{"OK": 1}]


def test_the_workers_compute_in_a_reply_header_splits_the_latency(rig: Rig) -> None:
    """A reply whose header starts with wait_us and compute_us (any msgpack uint width)
    counts its compute in the compute histogram and the rest of dispatch-to-reply in the
    wait-at-the-worker one; a reply without them, or with them elsewhere in the map,
    counts only in queue and total. The client gets the header as the worker wrote it."""
    from workers.codec import timing_entries

    rig.route("m")
    slot = rig.worker(b"w1", "m", credit=8)
    rig.router.activate("m", 1, [slot])
    c = rig.client()
    rest = msgpack.packb({"ok": True, "model": "m", "version": "v1"})[1:]  # fixmap's entries
    headers = [
        bytes([0x85]) + timing_entries(250_000, 4_000) + rest,  # uint32s, as workers send
        msgpack.packb({"wait_us": 1_500, "compute_us": 7, "ok": True, "model": "m"}),
        msgpack.packb({"ok": True, "wait_us": 9, "compute_us": 9}),  # not first: untimed
        msgpack.packb({"ok": True, "model": "m", "version": "v1"}),  # no timings at all
    ]
    for header in headers:
        send(c, "m")
        req = rig.take(b"w1")
        time.sleep(0.02)  # the worker holds it: time at the worker that is not compute
        rig.workers[b"w1"].send_multipart([p.KIND_REQUEST, req[1], b"OK", header, req[3]])
        rig.pump_until(lambda: c.poll(0))
        assert c.recv_multipart()[2] == header
    rig.router.flush_stats()
    ((queue, wait, compute, total), sums) = rig.hists[-1]
    assert (sum(queue), sum(wait), sum(compute), sum(total)) == (4, 2, 2, 4)
    assert DEFAULT_BOUNDS == (0.001, 0.01, 0.1, 1.0, 10.0)
    assert compute == [1, 1, 0, 0, 0, 0] and sums[2] == pytest.approx(0.004007)
    # The wait is the router's own measure (the worker's 250 ms claim is not it): each
    # held 20 ms, less its compute, and never more than the time end to end.
    assert wait[2] == 2 and 2 * 0.012 < sums[1] < sums[3]


def test_the_queue_is_shared_fairly_between_connections(rig: Rig) -> None:
    """A flood from one connection fills the queue; another's request takes the place of
    the flood's newest (answered OVERLOADED) and is served after at most one of it."""
    rig.route("m", max_queue=4)
    slot = rig.worker(b"w1", "m", credit=1)
    rig.router.activate("m", 1, [slot])
    flood, other = rig.client(), rig.client()
    for i in range(6):
        send(flood, "m", bytes([i]) * 4, id=i)
    first = rig.take(b"w1")
    header, _ = rig.answer(flood)  # the sixth: the queue holds four of its own
    assert header["error"]["code"] == p.OVERLOADED and header["id"] == 5
    send(other, "m", id=100)
    header, _ = rig.answer(flood)  # its newest gave up its place
    assert header["error"]["code"] == p.OVERLOADED and header["id"] == 4
    assert rig.router.queued_count() == 4
    order = [msgpack.unpackb(first[2])["id"]]
    rig.reply(b"w1", first)
    for _ in range(4):
        req = rig.take(b"w1")
        order.append(msgpack.unpackb(req[2])["id"])
        rig.reply(b"w1", req)
    assert order == [0, 1, 100, 2, 3]
    assert rig.router.core.model_rejections(rig.router.routes["m"].index) == (1, 1, 0)


def test_a_connection_past_its_unread_bytes_is_refused(tmp_path: Any) -> None:
    """Replies a connection has not read count in bytes; past the cap its requests get
    OVERLOADED while another connection is served; the count drops as it reads."""
    ctx: zmq.Context[Any] = zmq.Context()
    rig = Rig(str(tmp_path), ctx)
    try:
        rig.router.core.set_reply_limits(1 << 20, 1 << 30, p.error_map(p.OVERLOADED, "unread"))
        rig.route("m")
        slot = rig.worker(b"w1", "m", credit=8)
        rig.router.activate("m", 1, [slot])
        slow, other = rig.client(), rig.client()
        slow.setsockopt(zmq.RCVHWM, 1)
        big = b"y" * (512 << 10)
        for i in range(8):  # 4 MiB of replies: more than the sockets' buffers take
            send(slow, "m", big, id=i)
        for req in [rig.take(b"w1") for _ in range(8)]:
            rig.reply(b"w1", req)
        rig.pump_until(
            lambda: rig.router.inflight_count() == 0 and rig.router.peer_stats().most > 1 << 20
        )
        send(slow, "m", id=8)
        send(other, "m", id=9)
        req = rig.take(b"w1")
        assert msgpack.unpackb(req[2])["id"] == 9  # only the other one reached the worker
        rig.reply(b"w1", req)
        assert rig.answer(other)[0]["id"] == 9
        codes = []
        while len(codes) < 9:
            header, _ = rig.answer(slow)
            codes.append((header["id"], header["ok"] or header["error"]["code"]))
        assert codes == [(i, True) for i in range(8)] + [(8, p.OVERLOADED)]
        rig.pump_until(lambda: rig.router.peer_stats().held == 0)
    finally:
        rig.router.close()
        ctx.destroy(linger=0)


def test_a_client_that_leaves_has_its_queued_requests_dropped(rig: Rig) -> None:
    """The door's monitor tells the router a connection closed: what that client still
    has queued goes at once, another client's stays, and nothing is sent to a worker
    for nobody."""
    door = Door(rig.router.frontend, 100, on_closed=rig.router.peer_closed)
    try:
        rig.route("m")
        slot = rig.worker(b"w1", "m", credit=1)
        rig.router.activate("m", 1, [slot])
        leaver, stayer = rig.client(), rig.client()
        for i in range(4):
            send(leaver, "m", id=i)
        first = rig.take(b"w1")  # the worker holds one; three wait
        rig.pump_until(lambda: rig.router.queued_count() == 3)
        send(stayer, "m", id=10)
        rig.pump_until(lambda: rig.router.queued_count() == 4)
        rig.clients.remove(leaver)
        leaver.close(0)

        def dropped() -> bool:
            rig.pump(5)
            door.handle()
            return rig.router.peer_stats().dropped_gone == 3

        rig.pump_until(dropped)
        assert rig.router.queued_count() == 1
        rig.reply(b"w1", first)  # its reply finds nobody; the other client's goes next
        req = rig.take(b"w1")
        assert msgpack.unpackb(req[2])["id"] == 10
        rig.reply(b"w1", req)
        assert rig.answer(stayer)[0]["id"] == 10
    finally:
        door.close()


def test_no_credit_queues_in_order_then_overloaded(rig: Rig) -> None:
    rig.route("m", max_queue=2)
    slot = rig.worker(b"w1", "m", credit=1)
    rig.router.activate("m", 1, [slot])
    c = rig.client()
    for i in range(4):
        send(c, "m", bytes([i]) * 4, id=i)
    first = rig.take(b"w1")
    rig.pump_until(lambda: rig.router.queued_count() == 2 and c.poll(0))
    header, _ = rig.answer(c)  # the fourth: two waiting already
    assert header["error"]["code"] == p.OVERLOADED and header["id"] == 3
    rig.reply(b"w1", first)
    assert rig.answer(c)[0]["id"] == 0
    order = [0]
    for _ in range(2):
        req = rig.take(b"w1")
        order.append(msgpack.unpackb(req[2])["id"])
        rig.reply(b"w1", req)
        rig.answer(c)
    assert order == [0, 1, 2]
    assert rig.router.queued_count() == 0 and slot.load == 0


def test_drain_first_holds_requests_until_a_worker_is_activated(rig: Rig) -> None:
    rig.route("m")
    old = rig.worker(b"old", "m")
    rig.router.activate("m", 1, [old])
    rig.router.deactivate(old)
    c = rig.client()
    for i in range(3):
        send(c, "m", id=i)
    rig.pump_until(lambda: rig.router.queued_count() == 3)
    new = rig.worker(b"new", "m", credit=8)
    rig.router.activate("m", 2, [new])
    got = sorted(msgpack.unpackb(rig.take(b"new")[2])["id"] for _ in range(3))
    assert got == [0, 1, 2] and not rig.workers[b"old"].poll(0)


def test_deadlines_in_the_queue_and_at_a_worker(rig: Rig) -> None:
    rig.route("m")
    slot = rig.worker(b"w1", "m", credit=1)
    rig.router.activate("m", 1, [slot])
    c = rig.client()
    send(c, "m", id="held", timeout_ms=100)
    send(c, "m", id="queued", timeout_ms=100)
    held = rig.take(b"w1")
    time.sleep(0.15)
    rig.router.sweep(time.monotonic())
    answers = {rig.answer(c)[0]["id"]: None for _ in range(2)}
    assert set(answers) == {"held", "queued"}
    assert rig.router.queued_count() == 0
    assert slot.load == 1  # the worker still holds "held"; its late reply is dropped
    dropped = rig.router.dropped_replies
    rig.reply(b"w1", held)
    rig.pump_until(lambda: slot.load == 0)
    assert rig.router.dropped_replies == dropped + 1 and not c.poll(50)


def test_a_worker_silent_past_deadline_and_grace_is_reported(rig: Rig) -> None:
    rig.route("m")
    slot = rig.worker(b"w1", "m")
    rig.router.activate("m", 1, [slot])
    c = rig.client()
    send(c, "m", timeout_ms=50)
    rig.take(b"w1")
    time.sleep(0.1)
    rig.router.sweep(time.monotonic())
    assert rig.answer(c)[0]["error"]["code"] == p.DEADLINE_EXCEEDED
    time.sleep(0.25)
    rig.router.sweep(time.monotonic())
    assert rig.events.overdue == [b"w1"] and slot.load == 0


@pytest.mark.parametrize("retry", [True, False])
def test_worker_loss_retries_once_or_answers_worker_lost(rig: Rig, retry: bool) -> None:
    rig.route("m", retry=retry)
    a = rig.worker(b"a", "m")
    rig.router.activate("m", 1, [a])
    c = rig.client()
    send(c, "m", b"payload", id=1)
    rig.take(b"a")
    b = rig.worker(b"b", "m")
    rig.router.activate("m", 1, [b])
    assert rig.router.remove_worker(b"a", lost=True) == 1
    if retry:
        again = rig.take(b"b")
        assert again[3] == b"payload" and msgpack.unpackb(again[2])["id"] == 1
        rig.reply(b"b", again)
        assert rig.answer(c)[0]["ok"]
    else:
        header, _ = rig.answer(c)
        assert header["error"]["code"] == p.WORKER_LOST and header["id"] == 1
    assert a.load == 0 and a.core is None


def test_unreachable_worker_is_dropped_and_its_request_rerouted(rig: Rig) -> None:
    rig.route("m")
    ghost = WorkerSlot(b"ghost", "m", 1, "v1", 4)  # never connected
    rig.router.add_worker(ghost)
    live = rig.worker(b"live", "m")
    rig.router.activate("m", 1, [ghost, live])
    c = rig.client()
    send(c, "m", id=5)
    req = rig.take(b"live")
    assert rig.events.unreachable == [b"ghost"]
    rig.reply(b"live", req)
    assert rig.answer(c)[0]["ok"]


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"", b"nope"], p.BAD_REQUEST),
        ([b"", b"gpu-pool/9", b"\x80"], p.UNSUPPORTED_PROTOCOL),
        ([b"", p.PROTOCOL, b"\xc1"], p.BAD_REQUEST),
        ([b"", p.PROTOCOL, msgpack.packb({"model": "zz", "inputs": []})], p.NO_SUCH_MODEL),
    ],
)
def test_punted_messages_get_python_errors(rig: Rig, frames: list[bytes], code: str) -> None:
    rig.route("m")
    c = rig.client()
    c.send_multipart(frames)
    assert rig.answer(c)[0]["error"]["code"] == code


@pytest.mark.parametrize(
    "frames, code",
    [
        (
            [b"", b"gpu-pool/9", msgpack.packb({"model": "m", "inputs": [], "id": 7})],
            p.UNSUPPORTED_PROTOCOL,
        ),
        ([b"", p.PROTOCOL, msgpack.packb({"model": 3, "inputs": [], "id": 7})], p.BAD_REQUEST),
        (
            [b"", p.PROTOCOL, msgpack.packb({"model": "m", "timeout_ms": -1, "id": 7})],
            p.BAD_REQUEST,
        ),
    ],
)
def test_refusals_echo_the_id_of_a_readable_header(
    rig: Rig, frames: list[bytes], code: str
) -> None:
    rig.route("m")
    c = rig.client()
    c.send_multipart(frames)
    reply = rig.answer(c)[0]
    assert reply["error"]["code"] == code and reply["id"] == 7, reply


def test_a_failed_model_answers_unavailable_and_fails_its_queue(rig: Rig) -> None:
    route = rig.route("m")
    c = rig.client()
    send(c, "m", id=1)
    rig.pump_until(lambda: rig.router.queued_count() == 1)
    route.unavailable = "model 'm' is failed: test"
    assert rig.router.fail_queued("m", p.MODEL_UNAVAILABLE, route.unavailable) == 1
    send(c, "m", id=2)
    codes = {rig.answer(c)[0]["id"]: None for _ in range(2)}
    assert set(codes) == {1, 2} and rig.router.queued_count() == 0


@pytest.mark.slow
@pytest.mark.parametrize("rig", [False, True], ids=["backend", "lanes"], indirect=True)
def test_soak_every_request_gets_exactly_one_answer(rig: Rig) -> None:
    """Random traffic, worker churn and deadlines; counts answers per request id. With
    lanes, replies go back either way at random."""
    rng = random.Random(7)
    rig.route("m", max_queue=40, retry=True)
    live: dict[bytes, WorkerSlot] = {}
    serial = 0

    def spawn() -> None:
        nonlocal serial
        serial += 1
        wid = f"w{serial}".encode()
        live[wid] = rig.worker(wid, "m", credit=rng.randint(1, 4))
        rig.router.activate("m", 1, list(live.values()))

    for _ in range(3):
        spawn()
    clients = [rig.client() for _ in range(4)]
    sent: dict[int, int] = {}
    answered: dict[int, int] = {}
    next_id = 0
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        for cl in clients:
            if rng.random() < 0.6:
                size = rng.choice([0, 8, 5000, 300_000])
                send(cl, "m", bytes(size), id=next_id, timeout_ms=rng.choice([50, 2000]))
                sent[next_id] = 1
                next_id += 1
        rig.pump(1)
        for wid in list(live):
            while (req := rig.poll_worker(wid)) is not None:
                if req[0] != p.KIND_REQUEST:
                    continue
                if rng.random() < 0.05:
                    continue  # never answered: a deadline or the worker's loss settles it
                status = b"OK" if rng.random() < 0.9 else b"MODEL_ERROR"
                rig.reply(wid, req, status, backend=rng.random() < 0.3)
        if rng.random() < 0.05 and len(live) > 1:
            wid = rng.choice(list(live))
            del live[wid]
            rig.router.remove_worker(wid, lost=True)
            rig.workers.pop(wid).close(0)
            lane = rig.lanes.pop(wid, None)
            if lane is not None:
                lane.close()
            spawn()
        rig.router.sweep(time.monotonic())
        for cl in clients:
            while cl.poll(0):
                header = msgpack.unpackb(cl.recv_multipart()[2])
                if "id" in header:
                    answered[header["id"]] = answered.get(header["id"], 0) + 1
    # settle: answer what workers hold, let deadlines pass
    settle = time.monotonic() + 3.0
    while (len(answered) < len(sent) or rig.router.inflight_count()) and time.monotonic() < settle:
        rig.pump(5)
        for wid in live:
            while (req := rig.poll_worker(wid)) is not None:
                if req[0] == p.KIND_REQUEST:
                    rig.reply(wid, req)
        rig.router.sweep(time.monotonic())
        for cl in clients:
            while cl.poll(0):
                header = msgpack.unpackb(cl.recv_multipart()[2])
                answered[header["id"]] = answered.get(header["id"], 0) + 1
    assert set(answered) == set(sent), f"{len(sent) - len(answered)} requests unanswered"
    assert all(n == 1 for n in answered.values())
    assert rig.router.inflight_count() == 0 and rig.router.queued_count() == 0
    sent_down, received = rig.router.core.lane_counts()
    if not rig.lanes_on:
        assert (sent_down, received) == (0, 0)
    else:
        assert sent_down > 100 and received > 50, (sent_down, received)


def raw_answer(rig: Rig, client: zmq.Socket[Any], timeout: float = 5.0) -> bytes:
    end = time.monotonic() + timeout
    while not client.poll(0):
        assert time.monotonic() < end, "client got no answer"
        rig.pump(5)
        rig.router.sweep(time.monotonic())  # the pool's tick does this
    frames = client.recv_multipart()
    assert frames[:2] == [b"", p.PROTOCOL] and len(frames) == 3
    return frames[2]


def test_c_composes_the_error_replies_python_would_write(rig: Rig) -> None:
    # Byte for byte what protocol.error_header writes, for every way C answers a request
    # it holds: a deadline in the queue, a lost worker, a failed model; ids of each kind.
    rig.route("m", retry=False)
    c = rig.client()
    long_id = "\u20ac" * 80  # 240 bytes: a str8 head
    send(c, "m", id=long_id, timeout_ms=30)
    why = "waited in the queue past its deadline"
    assert raw_answer(rig, c) == p.error_header(p.DEADLINE_EXCEEDED, why, model="m", rid=long_id)

    for i, rid in enumerate([2**64 - 1, -(2**63), b"\x00bin", None]):
        wid = b"w%d" % i  # a new identity each time: the ROUTER refuses a reused one
        rig.router.activate("m", 1, [rig.worker(wid, "m")])
        send(c, "m", **({} if rid is None else {"id": rid}))
        rig.take(wid)
        rig.router.remove_worker(wid, lost=True)
        why = "the worker exited while computing this request"
        expected = p.error_header(p.WORKER_LOST, why, model="m", version="v1", rid=rid)
        assert raw_answer(rig, c) == expected, rid

    rig.router.activate("m", 1, [])
    send(c, "m", id=7)
    rig.pump_until(lambda: rig.router.queue_len("m") == 1)
    assert rig.router.fail_queued("m", p.MODEL_UNAVAILABLE, "the model failed: x") == 1
    expected = p.error_header(p.MODEL_UNAVAILABLE, "the model failed: x", model="m", rid=7)
    assert raw_answer(rig, c) == expected
    assert ("m", "v1", p.WORKER_LOST) in rig.observed
