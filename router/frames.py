"""Multipart send/receive without pyzmq's convenience layer.

``recv_multipart``/``send_multipart`` spend most of a small message's time on flag
arithmetic with enum objects; on the router's hot path that was about a third of the
per-request cost. These loops pass plain integer flags and read ``Frame.more``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
# Below this many bytes a part is copied into its message: cheaper than a zero-copy
# frame, whose bookkeeping costs more than the copy (pyzmq's own default threshold).
COPY_BELOW = 1 << 16


def recv_frames(sock: zmq.Socket[Any], flags: int = NOBLOCK) -> list[zmq.Frame]:
    """One whole multipart message as zero-copy frames; raises zmq.Again if none waits.
    (Arguments are positional: pyzmq's keyword handling costs microseconds per call.)"""
    recv = sock.recv
    frame = recv(flags, False)
    frames = [frame]
    while frame.more:
        frame = recv(0, False)
        frames.append(frame)
    return frames


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` as one message; ``flags`` (e.g. NOBLOCK) apply to every part.
    Small parts are copied, large ones (tensor bytes) sent without a copy."""
    send = sock.send
    last = len(frames) - 1
    more = flags | SNDMORE
    for i, frame in enumerate(frames):
        send(frame, more if i < last else flags, len(frame) < COPY_BELOW)
