"""The worker's end of the lane: small requests from the router without libzmq.

The router sends a small request to an idle worker as one SOCK_SEQPACKET datagram
(``router/fastlane.c``, "the lane"): one send(2) there wakes this process's loop
directly, where the backend socket would wake the router's libzmq I/O thread, then ours,
then the loop. A request that came down the lane is answered down the lane when its
reply fits in a datagram, otherwise on the backend socket, which the router reads too.

Datagram: u32 frame count, u32 length of each frame, then the frames back to back, all
little-endian; the first datagram the worker sends is its identity (the hello).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

from router import protocol as p

log = logging.getLogger(__name__)

MAX_BYTES = p.LANE_MAX_BYTES
MAX_FRAMES = p.LANE_MAX_FRAMES
_WORD = {4: "I", 8: "Q"}[p.LANE_WORD]  # the struct code of one header word
CONNECT_TIMEOUT_S = 5.0


class LaneFrame:
    """One frame of a lane datagram, read like a ``zmq.Frame``: ``bytes`` and ``buffer``
    (a view into the datagram, which it keeps alive)."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer

    @property
    def bytes(self) -> bytes:
        return self.buffer.tobytes()

    def __len__(self) -> int:
        return len(self.buffer)


class LaneError(Exception):
    """A datagram that breaks the lane's format."""


def pack(frames: Sequence[Any]) -> tuple[list[Any], int]:
    """The buffers of one datagram carrying ``frames`` (for ``socket.sendmsg``), and its
    size in bytes."""
    sizes = [memoryview(f).nbytes for f in frames]
    head = struct.pack(f"<{len(sizes) + 1}{_WORD}", len(sizes), *sizes)
    return [head, *frames], len(head) + sum(sizes)


def unpack(data: bytes) -> list[LaneFrame]:
    """The frames of one datagram, as views into ``data``."""
    view = memoryview(data)
    if len(view) < p.LANE_WORD:
        raise LaneError(f"a {len(view)}-byte datagram has no frame count")
    (count,) = struct.unpack_from(f"<{_WORD}", view)
    start = p.LANE_WORD * (1 + count)
    if not 0 < count <= MAX_FRAMES or len(view) < start:
        raise LaneError(f"bad frame count {count} in a {len(view)}-byte datagram")
    frames = []
    for size in struct.unpack_from(f"<{count}{_WORD}", view, p.LANE_WORD):
        end = start + size
        if end > len(view):
            raise LaneError("a frame runs past the end of its datagram")
        frames.append(LaneFrame(view[start:end]))
        start = end
    if start != len(view):
        raise LaneError(f"{len(view) - start} bytes after the last frame")
    return frames


class Lane:
    """A connected lane: ``recv`` what the router sent, ``send`` replies that fit."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.open = True

    @classmethod
    def connect(cls, path: str, wid: str) -> Lane | None:
        """Connect and say hello; None (and a warning) if the router's socket is not
        there: this worker then gets every request on the backend socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)  # a full listen backlog would block
            sock.connect(path)
            sock.send(wid.encode())
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            log.warning("worker %s: no lane (%s); using the backend socket only", wid, exc)
            return None
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self) -> list[LaneFrame] | None:
        """The next datagram's frames; None when none waits or the lane is closed."""
        data = self._io(self.sock.recv, MAX_BYTES)
        if data is None:
            return None
        if not data:  # the router closed it: the backend socket carries everything now
            self.close()
            return None
        return unpack(data)

    def send(self, frames: Sequence[Any]) -> bool:
        """Send one message; False if it was not sent (too big, the router's buffer is
        full, or the lane is closed): the caller sends it on the backend socket."""
        if not self.open or len(frames) > MAX_FRAMES:
            return False
        buffers, size = pack(frames)
        if size > MAX_BYTES:
            return False
        return self._io(self.sock.sendmsg, buffers) is not None

    def _io(self, op: Callable[[Any], Any], arg: Any) -> Any:
        """``op(arg)``, or None if it would block; a lane that fails is closed."""
        if not self.open:
            return None
        try:
            return op(arg)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            log.warning("lane closed: %s", exc)
            self.close()
            return None

    def close(self) -> None:
        if self.open:
            self.open = False
            self.sock.close()
