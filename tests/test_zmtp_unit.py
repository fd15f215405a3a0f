"""The gateway's own ZMTP link (gateway/zmtp.py) against libzmq's ROUTER, the socket type
poold's frontend is: the handshake, multipart messages small and large, replies out of
order, a dropped connection, and peers that break the protocol."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from gateway import zmtp
from gateway.errors import TIMEOUT, GatewayError
from gateway.tensors import WireTensor
from router import protocol as p


class EchoRouter:
    """A libzmq ROUTER in a thread that answers each request with its own input bytes,
    holding back the odd-numbered ones until the next request (or a quiet moment), so
    replies overtake each other."""

    def __init__(self, endpoint: str, curve: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve:
            _public, secret = zmq.curve_keypair()
            self.sock.curve_secretkey = secret
            self.sock.curve_server = True
        self.sock.bind(endpoint)
        self.seen: list[list[bytes]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        held: list[list[bytes]] = []
        while not self.stop.is_set():
            if not self.sock.poll(20):
                for r in held:
                    self.sock.send_multipart(r)
                held.clear()
                continue
            frames = self.sock.recv_multipart()
            self.seen.append(frames)
            ident, _empty, proto, header, *data = frames
            rid = msgpack.unpackb(header)["id"]
            spec = [{"dtype": "uint8", "shape": [len(d)]} for d in data]
            reply = [ident, b"", proto, msgpack.packb({"id": rid, "ok": True, "version": "7",
                                                       "outputs": spec}), *data]  # fmt: skip
            if rid % 2:
                held.append(reply)
                continue
            self.sock.send_multipart(reply)
            for r in held:
                self.sock.send_multipart(r)
            held.clear()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[str]:
    yield f"ipc://{tmp_path}/r.sock"


def _tensor(data: bytes) -> list[WireTensor]:
    return [WireTensor("uint8", (len(data),), data)]


def test_requests_small_and_large_come_back_matched_by_id(endpoint: str) -> None:
    router = EchoRouter(endpoint)

    async def main() -> list[Any]:
        link = zmtp.ZmtpUpstream(endpoint)
        link.start()
        payloads = [b"x" * 10, b"y" * 300, bytes(range(256)) * 1200, b"", memoryview(b"m" * 40000)]
        replies = await asyncio.gather(*(link.infer("m", _tensor(bytes(d)), 5.0) for d in payloads))
        link.close()
        return [(r.ok, r.version, bytes(r.outputs[0].data)) for r in replies] + [payloads]

    try:
        *got, payloads = asyncio.run(main())
    finally:
        router.close()
    assert got == [(True, "7", bytes(d)) for d in payloads]
    first = router.seen[0]
    assert first[1:3] == [b"", p.PROTOCOL]  # the same frames libzmq's DEALER sends
    assert msgpack.unpackb(first[3])["inputs"] == [{"dtype": "uint8", "shape": [10]}]


def test_a_dropped_connection_fails_what_is_in_flight_and_comes_back(endpoint: str) -> None:
    async def main() -> tuple[str, bool]:
        router = EchoRouter(endpoint)
        link = zmtp.ZmtpUpstream(endpoint)
        link.start()
        assert (await link.infer("m", _tensor(b"ab"), 5.0)).ok
        router.stop.set()  # the router stops answering...
        await asyncio.to_thread(router.thread.join, 5)
        held = asyncio.ensure_future(link.infer("m", _tensor(b"cd"), 5.0))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(router.close)  # ...and goes away with a request unanswered
        try:
            await held
            code = "answered"
        except GatewayError as exc:
            code = exc.code
        router = EchoRouter(endpoint)  # and comes back on the same address
        try:
            reply = await link.infer("m", _tensor(b"ef"), 5.0)
        finally:
            link.close()
            await asyncio.to_thread(router.close)
        return code, reply.ok

    code, ok = asyncio.run(main())
    assert code == p.MODEL_UNAVAILABLE
    assert ok


def test_an_unanswered_request_expires_on_the_link_s_sweep(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(zmtp, "WAIT_MARGIN_S", 0.0)
    monkeypatch.setattr(zmtp, "SWEEP_S", 0.02)

    async def main() -> tuple[str, float, int, int]:
        router = EchoRouter(endpoint)
        link = zmtp.ZmtpUpstream(endpoint)
        link.start()
        try:
            assert (await link.infer("m", _tensor(b"ab"), 5.0)).ok
            router.stop.set()  # connected, but answering nothing any more
            await asyncio.to_thread(router.thread.join, 5)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(link.infer("m", _tensor(b"cd"), 0.1), 5.0)
                code = "answered"
            except GatewayError as exc:
                code = exc.code
            except TimeoutError:
                code = "never expired"
            return code, time.monotonic() - t0, len(link.deadlines), len(link.pending)
        finally:
            link.close()
            await asyncio.to_thread(router.close)

    code, waited, deadlines, pending = asyncio.run(main())
    assert code == TIMEOUT
    assert 0.1 <= waited < 1.0  # its own wait, and at most a sweep or two more
    assert deadlines == pending == 0  # nothing left behind for answered or expired ones


def test_a_router_that_wants_curve_is_refused_not_half_spoken_to(endpoint: str) -> None:
    router = EchoRouter(endpoint, curve=True)

    async def main() -> tuple[zmtp.LinkState, int]:
        link = zmtp.ZmtpUpstream(endpoint)
        link.start()
        await asyncio.sleep(0.3)  # a few refused greetings, with back-off between them
        state, count = link.state, link.refusals
        link.close()
        await asyncio.sleep(0)
        return state, count

    try:
        state, refusals = asyncio.run(main())
    finally:
        router.close()
    assert state is zmtp.LinkState.CONNECTING  # never ready, so no request is ever sent
    assert 1 <= refusals <= 6  # tried again, but backing off: 20, 40, 80, 160 ms
    assert router.seen == []


class _Owner:
    def __init__(self) -> None:
        self.messages: list[list[bytes]] = []

    def on_message(self, frames: list[bytes]) -> None:
        self.messages.append(frames)

    def on_ready(self, link: Any) -> None:
        pass


ROUTER_READY = zmtp.ready_command(b"ROUTER")


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"GET / HTTP/1.1\r\n" + b"\x00" * 60, "ZMTP 3"),
        (zmtp.GREETING.replace(b"NULL", b"PLAIN"), "security mechanism"),
        (zmtp.GREETING + zmtp.encode_frame(b"too soon"), "before the handshake"),
        (zmtp.GREETING + zmtp.ready_command(b"PUB"), "not a ROUTER"),
        (zmtp.GREETING + ROUTER_READY + b"\x02" + (1 << 40).to_bytes(8, "big"), "over the limit"),
        (zmtp.GREETING + zmtp.command(b"READY", b"\x05Socket"), "runs past"),
        (zmtp.GREETING + zmtp.command(b"ERROR", b"\x04nope"), "refused us: nope"),
    ],
)
def test_a_peer_that_breaks_the_protocol_is_named(wire: bytes, why: str) -> None:
    link = zmtp._Link(_Owner(), max_frame=1 << 20)  # type: ignore[arg-type]
    with pytest.raises(zmtp.ZmtpError, match=why):
        link._parse(bytearray(wire))


def test_frames_split_anywhere_make_the_same_messages() -> None:
    owner = _Owner()
    link = zmtp._Link(owner, max_frame=1 << 20)  # type: ignore[arg-type]
    messages = [[b"", p.PROTOCOL, b"h" * n, b"d" * (n * 7)] for n in (0, 1, 255, 256, 5000)]
    wire = zmtp.GREETING + ROUTER_READY
    wire += b"".join(b"".join(bytes(c) for c in zmtp.encode_message(list(m))) for m in messages)
    for i in range(0, len(wire), 97):  # the reads a socket might hand us
        link.data_received(wire[i : i + 97])
    assert owner.messages == messages
    assert link.buf == bytearray()
