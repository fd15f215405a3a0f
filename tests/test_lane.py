"""The lane (``workers/lane.py`` and "the lane" in ``router/fastlane.c``): its datagram
format, its limits, and the router's choice of way, with fake workers in one process."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from test_router_core import Rig, send

from router import fastlane
from router import protocol as p
from workers import lane as lanemod
from workers.lane import Lane, LaneError, pack, unpack

needs_core = pytest.mark.skipif(not fastlane.available(), reason="router/_fastlane not built")


# ----------------------------------------------------------------- the format
def datagram(frames: list[Any]) -> bytes:
    buffers, size = pack(frames)
    data = b"".join(bytes(b) for b in buffers)
    assert len(data) == size
    return data


def test_pack_and_unpack_round_trip_any_buffers() -> None:
    frames: list[Any] = [b"R", b"k" * 8, b"", memoryview(b"abcdef")[2:], bytearray(b"\x00\xff")]
    data = datagram(frames)
    assert data[:4] == struct.pack("<I", 5)
    assert [f.bytes for f in unpack(data)] == [b"R", b"k" * 8, b"", b"cdef", b"\x00\xff"]


def test_unpacked_frames_are_views_that_keep_the_datagram() -> None:
    frames = unpack(datagram([b"R", b"payload"]))
    assert isinstance(frames[1].buffer, memoryview) and len(frames[1]) == 7
    assert frames[1].buffer.obj is frames[0].buffer.obj  # one datagram, no copies


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "no frame count"),
        (struct.pack("<I", 0), "bad frame count 0"),
        (struct.pack("<I", lanemod.MAX_FRAMES + 1), "bad frame count"),
        (struct.pack("<II", 2, 1) + b"x", "bad frame count 2"),
        (struct.pack("<II", 1, 5) + b"abc", "runs past the end"),
        (struct.pack("<II", 1, 1) + b"ab", "1 bytes after the last frame"),
    ],
)
def test_unpack_refuses_broken_datagrams(data: bytes, why: str) -> None:
    with pytest.raises(LaneError, match=why):
        unpack(data)


@pytest.fixture
def pair() -> Iterator[tuple[Lane, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    lane = Lane(ours)
    try:
        yield lane, theirs
    finally:
        lane.close()
        theirs.close()


def test_send_refuses_what_a_datagram_cannot_carry(pair: tuple[Lane, socket.socket]) -> None:
    lane, theirs = pair
    assert not lane.send([b"x" * lanemod.MAX_BYTES])
    assert not lane.send([b""] * (lanemod.MAX_FRAMES + 1))
    assert lane.send([b"R", b"ok"])
    assert [f.bytes for f in unpack(theirs.recv(1 << 16))] == [b"R", b"ok"]


def test_a_full_router_buffer_means_the_backend_socket(pair: tuple[Lane, socket.socket]) -> None:
    lane, _ = pair
    sent = 0
    while lane.send([b"R", b"x" * 30_000]):
        sent += 1
        assert sent < 10_000, "the socket buffer never filled"
    assert lane.open  # full is not broken


def test_recv_reads_one_datagram_and_notices_the_router_leaving(
    pair: tuple[Lane, socket.socket],
) -> None:
    lane, theirs = pair
    assert lane.recv() is None  # nothing waiting
    theirs.send(datagram([b"R", b"k" * 8, b"{}"]))
    assert [f.bytes for f in lane.recv() or []] == [b"R", b"k" * 8, b"{}"]
    theirs.close()
    assert lane.recv() is None and not lane.open
    assert not lane.send([b"R"])


def test_connect_without_a_router_socket_warns_and_gives_none(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert Lane.connect(str(tmp_path / "missing.sock"), "w1") is None
    assert "no lane" in caplog.text and "backend socket only" in caplog.text


# ------------------------------------------------------------- the router's side
@pytest.fixture
def lane_rig(tmp_path: Any) -> Iterator[Rig]:
    ctx: zmq.Context[Any] = zmq.Context()
    r = Rig(str(tmp_path), ctx, lanes=True)
    try:
        yield r
    finally:
        r.close()
        ctx.term()


def one_worker(rig: Rig, credit: int = 2) -> tuple[Any, zmq.Socket[Any]]:
    """Model "m" served by worker w1 (with its lane), and a client."""
    rig.route("m")
    slot = rig.worker(b"w1", "m", credit=credit)
    rig.router.activate("m", 1, [slot])
    return slot, rig.client()


def serve_one(rig: Rig, client: zmq.Socket[Any], **extra: Any) -> tuple[list[bytes], bool]:
    """Send one request; return it as the worker got it, and whether by the lane."""
    send(client, "m", **extra)
    req = rig.take(b"w1")
    return req, req[1] in rig.by_lane


@needs_core
def test_small_requests_and_replies_go_down_the_lane(lane_rig: Rig) -> None:
    rig = lane_rig
    slot, c = one_worker(rig, credit=4)
    reqs = [serve_one(rig, c, id=i) for i in range(3)]
    assert all(by_lane for _, by_lane in reqs) and slot.load == 3
    first = reqs[0][0]
    assert first[0] == p.KIND_REQUEST and len(first[1]) == 8
    assert msgpack.unpackb(first[2])["id"] == 0 and first[3] == b"x" * 16
    assert not rig.workers[b"w1"].poll(0)  # nothing on the backend socket
    for req, _ in reqs:
        rig.reply(b"w1", req)
    assert sorted(rig.answer(c)[0]["id"] for _ in range(3)) == [0, 1, 2]
    assert slot.load == 0 and slot.served == 3
    assert rig.router.core.lane_counts() == (3, 3)
    rig.router.flush_stats()
    assert rig.bulk == [{"OK": 3}]  # counted as any reply is


@needs_core
def test_without_lanes_nothing_listens(tmp_path: Any) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    rig = Rig(str(tmp_path), ctx, lanes=False)
    try:
        assert rig.router.lane == "" and not (tmp_path / "lane.sock").exists()
    finally:
        rig.close()
        ctx.term()


@needs_core
def test_large_requests_and_either_way_of_replying(lane_rig: Rig) -> None:
    rig = lane_rig
    slot, c = one_worker(rig)
    send(c, "m", b"y" * (lanemod.MAX_BYTES + 1), id="big")
    big = rig.take(b"w1")
    assert big[1] not in rig.by_lane and len(big[3]) == lanemod.MAX_BYTES + 1
    rig.reply(b"w1", big)
    assert rig.answer(c)[0]["id"] == "big"
    small, by_lane = serve_one(rig, c, id="small")
    assert by_lane
    rig.reply(b"w1", small, backend=True)  # e.g. a reply too large for a datagram
    header, buffers = rig.answer(c)
    assert header["id"] == "small" and buffers == [b"x" * 16] and slot.load == 0


@needs_core
def test_a_closed_lane_leaves_the_backend_socket(lane_rig: Rig) -> None:
    rig = lane_rig
    slot, c = one_worker(rig)
    rig.lanes.pop(b"w1").close()
    rig.pump_until(lambda: not rig.router.core.worker_has_lane(slot.index))
    req, by_lane = serve_one(rig, c, id=7)
    assert not by_lane
    rig.reply(b"w1", req)
    assert rig.answer(c)[0]["id"] == 7


@needs_core
def test_a_hello_from_a_stranger_is_hung_up_on(lane_rig: Rig) -> None:
    rig = lane_rig
    rig.route("m")
    stranger = Lane.connect(rig.lane_path, "nobody")
    assert stranger is not None
    end = time.monotonic() + 5
    while stranger.open:
        assert time.monotonic() < end, "the router kept a lane nobody owns"
        rig.pump(5)
        stranger.recv()  # b"": closed by the router
    slot = rig.worker(b"w1", "m")  # a real worker still gets its lane
    assert rig.router.core.worker_has_lane(slot.index)


@needs_core
def test_a_removed_worker_loses_its_lane(lane_rig: Rig) -> None:
    rig = lane_rig
    rig.route("m")
    slot = rig.worker(b"w1", "m")
    rig.router.remove_worker(b"w1", lost=False)
    lane = rig.lanes[b"w1"]
    end = time.monotonic() + 5
    while lane.open:
        assert time.monotonic() < end, "the router kept the lane of a removed worker"
        lane.recv()
        time.sleep(0.01)
    assert slot.core is None


# ------------------------------------------------------------------ a real pool
@pytest.mark.slow
def test_a_pool_without_lanes_serves_on_the_backend_socket(tmp_path: Any) -> None:
    import numpy as np
    from modelkit import make_mlp, mlp_input, mlp_reference
    from poolkit import running_pool

    from router.client import Client

    mlp = make_mlp(str(tmp_path / "mlp.pt"), seed=3)
    models = [{"name": "mlp", "path": mlp, "version": "3", "devices": ["cpu"]}]
    with running_pool(str(tmp_path), models, router_lane=False) as pool:
        (worker,) = pool.status()["models"][0]["workers"]
        assert worker["lane"] is False
        with Client(pool.frontend, timeout=30) as c:
            for i in range(20):
                x = mlp_input(1 + i % 3, seed=i)
                out = c.infer("mlp", x).outputs[0]
                assert np.allclose(out, mlp_reference(3, x), rtol=1e-5, atol=1e-6)
