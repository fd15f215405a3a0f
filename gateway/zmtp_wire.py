"""ZMTP 3.0's wire forms, for the gateway's router link (gateway/zmtp.py says why and
what it speaks): the greeting, commands, frame heads and whole messages."""

from __future__ import annotations

from typing import Any, Final

from router import protocol as p

MORE: Final = 0x01
LONG: Final = 0x02
COMMAND: Final = 0x04
GREETING: Final = (
    b"\xff" + b"\x00" * 8 + b"\x7f" + bytes((3, 0)) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
)
# A frame body this large is written from its own buffer and read as a view of the
# socket's read, not copied; smaller ones are cheaper to copy than to track.
BIG_FRAME: Final = 16384


class ZmtpError(Exception):
    """The peer broke the protocol; the connection is closed and made again."""


def command(name: bytes, body: bytes = b"") -> bytes:
    payload = bytes((len(name),)) + name + body
    return encode_frame(payload, COMMAND)


def ready_command(socket_type: bytes = b"DEALER") -> bytes:
    prop = b"Socket-Type"
    return command(b"READY", bytes((len(prop),)) + prop + len(socket_type).to_bytes(4, "big")
                   + socket_type)  # fmt: skip


def frame_head(size: int, flags: int) -> bytes:
    if size < 256:
        return bytes((flags, size))
    return bytes((flags | LONG,)) + size.to_bytes(8, "big")


def encode_frame(body: bytes, flags: int = 0) -> bytes:
    return frame_head(len(body), flags) + body


def encode_message(frames: list[Any], prefix: bytes = b"") -> list[Any]:
    """The wire chunks of a multipart message (after ``prefix``, frames already encoded);
    large bodies stay separate (not copied)."""
    out: list[Any] = []
    small: list[Any] = [prefix]
    last = len(frames) - 1
    for i, body in enumerate(frames):
        size = len(body) if not isinstance(body, memoryview) else body.nbytes
        small.append(frame_head(size, MORE if i < last else 0))
        if size >= BIG_FRAME:
            out.append(b"".join(small))
            out.append(body)
            small = []
        else:
            small.append(body)
    if small:
        out.append(b"".join(small))
    return out


# The first two frames of every request: the DEALER's empty delimiter and the protocol.
REQUEST_PREFIX: Final = bytes((MORE, 0, MORE, len(p.PROTOCOL))) + p.PROTOCOL


def encode_request(header: bytes, datas: list[Any]) -> list[Any]:
    """``encode_message([b"", PROTOCOL, header, *datas])`` with its constant part
    prebuilt: the hot path's one call."""
    return encode_message([header, *datas], REQUEST_PREFIX)


def parse_ready(body: bytes) -> dict[bytes, bytes]:
    """The properties of a READY command's body (after the name)."""
    props, i = {}, 0
    while i < len(body):
        n = body[i]
        name = body[i + 1 : i + 1 + n]
        i += 1 + n
        if i + 4 > len(body):
            raise ZmtpError("READY property runs past the command")
        size = int.from_bytes(body[i : i + 4], "big")
        props[name] = body[i + 4 : i + 4 + size]
        i += 4 + size
    if i != len(body):
        raise ZmtpError("READY property runs past the command")
    return props
