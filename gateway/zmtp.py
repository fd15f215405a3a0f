"""The gateway's router link without libzmq: ZMTP 3.0 spoken by the asyncio loop itself.

Why: with libzmq, every request crosses two threads twice. The loop hands the message to
libzmq's I/O thread (a mailbox write that wakes it), which writes the socket; the reply
is read by that thread, which wakes the loop through the mailbox again. On a host of
idle cores each hand-off is a cross-core wake-up, and a request paid four of them plus
eight syscalls. Here the loop writes the request to the unix socket itself (one write)
and reads the reply when epoll says the socket is readable (one read): no other thread.

What it speaks (rfc.zeromq.org/spec/23, ZMTP 3.0; libzmq accepts it from any 4.x peer)::

    greeting   0xFF, 8 padding bytes, 0x7F, version 3.0, "NULL" padded to 20 bytes,
               as-server 0, 31 zero bytes                        (64 bytes, both ways)
    handshake  READY command with Socket-Type=DEALER; the router sends its own READY
    frames     flags (0x01 MORE, 0x02 LONG size, 0x04 COMMAND), size (1 byte, or 8 bytes
               big-endian when LONG), body
    commands   READY (handshake), PING -> PONG, ERROR (the peer refused us)

Only the NULL mechanism: with CURVE on the frontend the gateway keeps libzmq's DEALER
(gateway/upstream.py), which also serves as the reference behaviour this one matches.
The router sees an ordinary DEALER peer; a dropped connection fails the requests in
flight at once (libzmq would leave them to their timers) and is made again with back-off.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import socket
from typing import Any, Final

from gateway.errors import TIMEOUT, GatewayError
from gateway.tensors import WireTensor
from gateway.upstream import (
    DEFAULT_WAIT_S,
    WAIT_MARGIN_S,
    Reply,
    expire,
    request_header,
    settle,
)
from gateway.zmtp_wire import (  # noqa: F401  (the names tests and callers use here)
    BIG_FRAME,
    COMMAND,
    GREETING,
    LONG,
    MORE,
    ZmtpError,
    command,
    encode_frame,
    encode_message,
    encode_request,
    frame_head,
    parse_ready,
    ready_command,
)
from router import protocol as p

log = logging.getLogger(__name__)

RECONNECT_MIN_S: Final = 0.02
RECONNECT_MAX_S: Final = 2.0
# Our socket's send buffer: the kernel's default (208 KiB on Linux) splits a large
# request over several loop turns; the kernel caps this at net.core.wmem_max.
SEND_BUFFER: Final = 4 << 20
# Unsent bytes we let pile up while the router reads slowly before refusing (OVERLOADED),
# as libzmq's SNDHWM would.
MAX_BUFFERED: Final = 256 << 20
# How often requests are checked against their deadlines: one timer for the link, not
# one per request (the waits are the request's timeout plus 10 s, or 120 s).
SWEEP_S: Final = 1.0


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # no connection, or one still in its greeting or handshake
    READY = "ready"  # handshake done: requests flow
    CLOSED = "closed"  # close() was called


TRANSITIONS: Final[dict[LinkState, frozenset[LinkState]]] = {
    LinkState.CONNECTING: frozenset({LinkState.READY, LinkState.CLOSED}),
    LinkState.READY: frozenset({LinkState.CONNECTING, LinkState.CLOSED}),
    LinkState.CLOSED: frozenset(),
}


class _Link(asyncio.Protocol):
    """One connection: greeting, handshake, then multipart messages to ``owner``."""

    def __init__(self, owner: ZmtpUpstream, max_frame: int) -> None:
        self.owner = owner
        self.max_frame = max_frame
        self.transport: Any = None  # asyncio's or uvloop's transport
        self.buf = bytearray()
        self.greeted = False
        self.ready = False
        self.parts: list[bytes] = []
        self.ended = asyncio.Event()  # set when the connection ends, for whoever made it

    def itself(self) -> _Link:
        """The protocol factory for the connection this link is made for."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # a resnet50 input (294 KiB) in one write, not one write per loop turn
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass  # the kernel's default then; still correct
        self.transport.write(GREETING + ready_command())

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        try:
            if buf:  # the rest of a frame we had begun: parse it from our buffer
                buf += data
                used = self._parse(buf)
                if used:
                    del buf[:used]
            else:  # the usual case, whole messages: parse them from the read itself
                used = self._parse(data)
                if used < len(data):
                    buf += memoryview(data)[used:]
        except ZmtpError as exc:
            log.warning("router connection: %s", exc)
            if self.transport is not None:
                self.transport.abort()

    def _parse(self, buf: bytes | bytearray) -> int:
        """Frames from ``buf``, the bytes used. From a bytearray (ours, cut after this)
        every frame body is copied out; from the read's own bytes, which nobody changes,
        a large body is a view of it instead (no copy of an output tensor)."""
        pos, end = 0, len(buf)
        if not self.greeted:
            if end < 64:
                return 0
            if buf[0] != 0xFF or buf[9] & 1 != 1 or buf[10] < 3:
                raise ZmtpError("the peer does not speak ZMTP 3")
            if bytes(buf[12:32]).rstrip(b"\x00") != b"NULL":
                raise ZmtpError("the router wants a security mechanism (CURVE?) we lack")
            self.greeted, pos = True, 64
        ours = isinstance(buf, bytearray)
        with memoryview(buf) as mv:
            while end - pos >= 2:
                flags = buf[pos]
                if flags & LONG:
                    if end - pos < 9:
                        break
                    size, head = int.from_bytes(mv[pos + 1 : pos + 9], "big"), 9
                else:
                    size, head = buf[pos + 1], 2
                if size > self.max_frame:
                    raise ZmtpError(f"a frame of {size} bytes is over the limit")
                if end - pos < head + size:
                    break
                start = pos + head
                pos = start + size
                body: Any
                if ours:
                    body = bytes(mv[start:pos])
                elif size >= BIG_FRAME:
                    body = buf[start:pos] if flags & COMMAND else mv[start:pos]
                else:
                    body = buf[start:pos]
                if flags & COMMAND:
                    self._command(bytes(body))
                elif not self.ready:
                    raise ZmtpError("a message before the handshake ended")
                else:
                    self.parts.append(body)
                    if not flags & MORE:
                        parts, self.parts = self.parts, []
                        self.owner.on_message(parts)
        return pos

    def _command(self, body: bytes) -> None:
        n = body[0] if body else 0
        name, rest = body[1 : 1 + n], body[1 + n :]
        if name == b"READY" and not self.ready:
            socket_type = parse_ready(rest).get(b"Socket-Type", b"")
            if socket_type != b"ROUTER":
                raise ZmtpError(f"the peer is a {socket_type!r} socket, not a ROUTER")
            self.ready = True
            self.owner.on_ready(self)
        elif name == b"PING" and self.transport is not None:
            self.transport.write(command(b"PONG", rest[2:]))  # echo its context
        elif name == b"ERROR":
            reason = rest[1 : 1 + rest[0]] if rest else b""
            raise ZmtpError(f"the router refused us: {reason.decode(errors='replace')}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.owner.writable = False

    def resume_writing(self) -> None:
        self.owner.writable = True


class ZmtpUpstream:
    """The same calls as gateway.upstream.Upstream, over our own ZMTP connection."""

    def __init__(self, endpoint: str, max_frame: int = 1 << 31) -> None:
        if not endpoint.startswith(("ipc://", "tcp://")):
            raise ValueError(f"{endpoint!r}: ZMTP needs an ipc:// or tcp:// endpoint")
        self.endpoint = endpoint
        self.max_frame = max_frame
        self.state = LinkState.CONNECTING
        self.link: _Link | None = None
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.deadlines: dict[int, tuple[float, float]] = {}  # id -> (loop time, wait)
        self.ids = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.writable = True
        self.refusals = 0  # connections that ended before their handshake did
        self._up: asyncio.Event | None = None
        self._connector: asyncio.Task[None] | None = None

    def to(self, new: LinkState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"router link: {self.state.value} -> {new.value}")
        self.state = new

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._up = asyncio.Event()
        self._connector = self.loop.create_task(self._connect())
        self.loop.call_later(SWEEP_S, self._sweep)

    async def _connect(self) -> None:
        """Connect, and connect again whenever a connection ends, until close()."""
        assert self.loop is not None
        delay = RECONNECT_MIN_S
        while self.state is not LinkState.CLOSED:
            link = _Link(self, self.max_frame)
            try:
                if self.endpoint.startswith("ipc://"):
                    await self.loop.create_unix_connection(link.itself, self.endpoint[6:])
                else:
                    host, _, port = self.endpoint[6:].rpartition(":")
                    await self.loop.create_connection(link.itself, host.strip("[]"), int(port))
                await link.ended.wait()
            except OSError as exc:
                log.warning("router connection %s: %s", self.endpoint, exc)
            if link.ready:
                delay = RECONNECT_MIN_S  # it worked for a while: try again at once
            if self.state is LinkState.CLOSED:
                return
            log.info("router connection %s: connecting again in %.2fs", self.endpoint, delay)
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX_S, delay * 2)

    def on_ready(self, link: _Link) -> None:
        if self.state is not LinkState.CONNECTING:
            return
        self.link, self.writable = link, True
        self.to(LinkState.READY)
        assert self._up is not None
        self._up.set()
        log.info("router connection %s: ready (ZMTP)", self.endpoint)

    def on_lost(self, link: _Link, exc: Exception | None) -> None:
        link.ended.set()
        if link is not self.link:
            self.refusals += 1
            return  # lost in its greeting or handshake: nothing was sent on it
        self.link = None
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(
                    GatewayError(
                        p.MODEL_UNAVAILABLE, "the gateway lost its connection to the router"
                    )
                )
        self.pending.clear()
        if self.state is LinkState.READY:
            self.to(LinkState.CONNECTING)
            assert self._up is not None
            self._up.clear()
            log.warning("router connection %s lost (%s)", self.endpoint, exc or "closed")

    def on_message(self, frames: list[bytes]) -> None:
        settle(self.pending, frames)

    async def infer(
        self, model: str, inputs: list[WireTensor], timeout_s: float | None = None
    ) -> Reply:
        wait = DEFAULT_WAIT_S if timeout_s is None else timeout_s + WAIT_MARGIN_S
        link = self.link
        if link is None or link.transport is None:
            assert self._up is not None, "ZmtpUpstream.start() was not called"
            try:
                await asyncio.wait_for(self._up.wait(), wait)
            except TimeoutError:
                raise GatewayError(TIMEOUT, "no connection to the router") from None
            link = self.link
            if link is None or link.transport is None:
                raise GatewayError(p.MODEL_UNAVAILABLE, "no connection to the router")
        transport = link.transport
        if not self.writable and transport.get_write_buffer_size() > MAX_BUFFERED:
            raise GatewayError(p.OVERLOADED, "the gateway's queue to the router is full")
        rid = next(self.ids)
        header = request_header(model, inputs, rid, timeout_s)
        loop = self.loop
        assert loop is not None
        fut: asyncio.Future[Reply] = loop.create_future()
        self.pending[rid] = fut
        self.deadlines[rid] = (loop.time() + wait, wait)
        transport.writelines(encode_request(header, [t.data for t in inputs]))
        try:
            return await fut
        finally:
            self.pending.pop(rid, None)
            self.deadlines.pop(rid, None)

    def _sweep(self) -> None:
        """Expire the requests past their wait: one timer per link, every ``SWEEP_S``
        (a timer per request cost a timer handle made and cancelled per request)."""
        assert self.loop is not None
        if self.state is LinkState.CLOSED:
            return
        now = self.loop.time()
        late = [(rid, wait) for rid, (at, wait) in self.deadlines.items() if at <= now]
        for rid, wait in late:
            del self.deadlines[rid]
            fut = self.pending.get(rid)
            if fut is not None:
                expire(fut, wait)
        self.loop.call_later(SWEEP_S, self._sweep)

    def close(self) -> None:
        if self.state is not LinkState.CLOSED:
            self.to(LinkState.CLOSED)
        if self._connector is not None:
            self._connector.cancel()
        if self.link is not None and self.link.transport is not None:
            self.link.transport.close()
        for fut in self.pending.values():
            if not fut.done():
                fut.cancel()
