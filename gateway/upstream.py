"""The gateway's one connection to the router: a ZeroMQ DEALER with many requests in flight.

Every OIP request becomes an ordinary gpu-pool/1 request on poold's frontend, so it gets
the same queues, deadlines, batching, version routing and zero-loss upgrades as any
ZeroMQ client. Requests carry an integer ``id``; replies come back in any order and are
matched to their waiting future by it.

The socket is read from the asyncio loop through libzmq's notification fd. That fd is
edge-triggered, so after every send and every read we ask ``ZMQ_EVENTS`` and read while
it says POLLIN (the ZeroMQ guide's rule for ZMQ_FD), and never block the loop. Asking
the events is cheaper than reading until EAGAIN: pyzmq turns each EAGAIN into an
exception, and this is the hot path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import zmq

from gateway.errors import TIMEOUT, GatewayError
from gateway.tensors import WireTensor
from router import protocol as p

log = logging.getLogger(__name__)

# How far past the request's own deadline we wait for the router's answer. The router
# always answers (DEADLINE_EXCEEDED at the latest, after its grace), so this only matters
# if poold is gone; then the lifeline ends this process anyway.
WAIT_MARGIN_S = 10.0
DEFAULT_WAIT_S = 120.0


@dataclass(frozen=True)
class Reply:
    """The router's answer: ok with outputs, or an error code and message."""

    ok: bool
    version: str
    outputs: tuple[WireTensor, ...] = ()
    code: str = ""
    message: str = ""


class RouterLink(Protocol):
    """What the HTTP and gRPC APIs need of the router: ``Upstream`` (libzmq, any
    security) or ``gateway.zmtp.ZmtpUpstream`` (the loop's own ZMTP, NULL only)."""

    async def infer(
        self, model: str, inputs: list[WireTensor], timeout_s: float | None = None
    ) -> Reply: ...


def decode_reply(frames: list[bytes]) -> tuple[Any, Reply]:
    """(request id, reply) from a DEALER's frames: b"", protocol, header, *output frames."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) < 2 or frames[0] != p.PROTOCOL:
        raise ValueError("reply is not gpu-pool/1")
    header = p.unpack_map(frames[1], limit=1 << 31)
    version = str(header.get("version", ""))
    if not header.get("ok"):
        err = header.get("error") or {}
        code = str(err.get("code", p.INTERNAL)) if isinstance(err, dict) else p.INTERNAL
        message = str(err.get("message", "")) if isinstance(err, dict) else ""
        return header.get("id"), Reply(False, version, code=code, message=message)
    outputs, nxt = [], 2
    for spec in header.get("outputs", []):
        data = spec.get("data")
        if data is None:
            data = frames[nxt]
            nxt += 1
        outputs.append(WireTensor(spec["dtype"], tuple(spec["shape"]), data))
    return header.get("id"), Reply(True, version, tuple(outputs))


def expire(fut: asyncio.Future[Reply], wait: float) -> None:
    """A request's timer: the router said nothing within ``wait`` seconds."""
    if not fut.done():
        fut.set_exception(GatewayError(TIMEOUT, f"no answer from the router within {wait:.0f}s"))


def request_header(
    model: str, inputs: list[WireTensor], rid: int, timeout_s: float | None
) -> bytes:
    """The packed header of one request (both router links send the same one)."""
    header: dict[str, Any] = {
        "model": model,
        "inputs": [{"dtype": t.dtype, "shape": list(t.shape)} for t in inputs],
        "id": rid,
    }
    if timeout_s is not None:
        header["timeout_ms"] = max(1, int(timeout_s * 1000))
    return msgpack.packb(header)


def settle(pending: dict[int, asyncio.Future[Reply]], frames: list[bytes]) -> None:
    """Hand one reply to the request waiting for it; a malformed one is logged, dropped."""
    try:
        rid, reply = decode_reply(frames)
    except (ValueError, KeyError, TypeError, IndexError, p.ProtocolError) as exc:
        log.warning("dropping a malformed reply from the router: %s", exc)
        return
    fut = pending.pop(rid, None) if isinstance(rid, int) else None
    if fut is not None and not fut.done():
        fut.set_result(reply)


class Upstream:
    def __init__(
        self,
        endpoint: str,
        *,
        curve: tuple[bytes, bytes, bytes] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        """``curve``: (server public key, our public key, our secret key) when CURVE is on."""
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        self.ids = itertools.count(1)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.getsockopt(zmq.FD), self._drain)

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self.loop is not None:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _readable(self) -> bool:
        try:
            return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        except zmq.ZMQError as exc:
            log.warning("router connection: %s", exc)
            return False

    def _drain(self) -> None:
        self._drain_scheduled = False
        while self._readable():
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("router connection: %s", exc)
                return
            settle(self.pending, frames)

    async def infer(
        self, model: str, inputs: list[WireTensor], timeout_s: float | None = None
    ) -> Reply:
        rid = next(self.ids)
        header = request_header(model, inputs, rid, timeout_s)
        frames: list[Any] = [b"", p.PROTOCOL, header, *(t.data for t in inputs)]
        assert self.loop is not None, "Upstream.start() was not called"
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self.pending[rid] = fut
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.pending.pop(rid, None)
            raise GatewayError(p.OVERLOADED, "the gateway's queue to the router is full") from None
        if self._readable():  # the fd is edge-triggered: a send may have hidden a POLLIN
            self._schedule_drain()
        wait = DEFAULT_WAIT_S if timeout_s is None else timeout_s + WAIT_MARGIN_S
        # A plain timer, not asyncio.wait_for: this is the hot path, and wait_for wraps
        # the future in a task on Python 3.11.
        timer = self.loop.call_later(wait, expire, fut, wait)
        try:
            return await fut
        finally:
            timer.cancel()
            self.pending.pop(rid, None)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        for fut in self.pending.values():
            if not fut.done():
                fut.cancel()
        self.sock.close(linger=0)
