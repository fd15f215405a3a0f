"""Answers on the way out: each request's share of its batch's outputs, or an error.

The worker's loop hands a completed launch here; every request gets exactly one reply
frame set ``[kind, key, status, header, *tensor frames]``: down the lane if the request
came that way and the reply fits (``workers.lane``), otherwise on the backend socket. The
replier also counts what it answered and which input shapes it served (the heartbeat
reports both; the next version of the model warms up with those shapes).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import zmq

from router import protocol as p
from router.frames import send_frames
from workers.codec import HostOutputs, ReplyEncoder, timing_entries
from workers.lane import Lane
from workers.pipeline import Launched, Pending


class Replier:
    def __init__(self, sock: zmq.Socket[Any], model: str, version: str) -> None:
        self.sock = sock
        self.model = model
        self.version = version
        self.encoder = ReplyEncoder(model, version)
        self.served = 0  # requests answered, errors included
        self.model_errors = 0  # of them MODEL_ERROR (poold's watch window reads it)
        self.shapes: dict[tuple[Any, ...], int] = {}  # input signature -> times served
        self.lane: Lane | None = None
        self.lane_keys: set[bytes] = set()  # requests that came down the lane, unanswered

    def send(self, key: bytes, frames: list[Any]) -> None:
        """One reply: the way its request came when that can carry it."""
        if self.lane_keys and key in self.lane_keys:
            self.lane_keys.discard(key)
            if self.lane is not None and self.lane.send(frames):
                return
        send_frames(self.sock, frames)

    def finish(self, launched: Launched) -> None:
        """Answer every request of a completed launch, each reply saying how long the
        request waited in this worker before the launch's compute began and how long
        that compute took (the router's latency histograms split on them)."""
        encoder = self.encoder
        send = self.send
        now = time.monotonic()
        compute = launched.compute_s()
        compute_us = int(compute * 1e6)
        began = now - compute  # everything before it, since the take, was waiting

        def timing(req: Pending) -> tuple[int, int]:
            return max(0, int((began - req.taken) * 1e6)), compute_us

        for members, result in launched.groups:
            if result.outputs is not None:
                try:
                    host = HostOutputs(result.outputs)
                except TypeError as exc:
                    for req in members:
                        self.error(req.key, req.layout.rid, p.MODEL_ERROR, str(exc), timing(req))
                    continue
                start = 0
                for req in members:
                    stop = start + req.layout.size
                    timed = timing_entries(*timing(req))
                    header, frames = encoder.encode(host, start, stop, req.layout.rid, timed)
                    start = stop
                    send(req.key, [p.KIND_REQUEST, req.key, b"OK", header, *frames])
                self.served += len(members)
            else:
                assert result.alone is not None
                for req, outcome in zip(members, result.alone, strict=True):
                    if isinstance(outcome, BaseException):
                        msg = f"{type(outcome).__name__}: {outcome}"
                        self.error(
                            req.key, req.layout.rid, p.MODEL_ERROR, msg[:4000], timing(req)
                        )
                    else:
                        self.reply(req, outcome, timing(req))
            self.remember_shapes(members[0])

    def fail(self, launched: Launched, exc: BaseException) -> None:
        """A launch that cannot complete (a device error): every request gets it."""
        msg = f"{type(exc).__name__}: {exc}"[:4000]
        for members, _ in launched.groups:
            for req in members:
                self.error(req.key, req.layout.rid, p.MODEL_ERROR, msg)

    def remember_shapes(self, req: Pending) -> None:
        key = req.layout.signature
        self.shapes[key] = self.shapes.get(key, 0) + 1

    def reply(self, req: Pending, outputs: list[torch.Tensor], timing: tuple[int, int]) -> None:
        """One request's own outputs (it ran alone)."""
        try:
            host = HostOutputs(outputs)
        except TypeError as exc:
            self.error(req.key, req.layout.rid, p.MODEL_ERROR, str(exc), timing)
            return
        timed = timing_entries(*timing)
        header, frames = self.encoder.encode(host, 0, None, req.layout.rid, timed)
        self.served += 1
        self.send(req.key, [p.KIND_REQUEST, req.key, b"OK", header, *frames])

    def error(
        self,
        key: bytes,
        rid: Any,
        code: str,
        message: str,
        timing: tuple[int, int] | None = None,
    ) -> None:
        """``timing``: (wait_us, compute_us) when the request was in a launched batch."""
        self.served += 1
        if code == p.MODEL_ERROR:
            self.model_errors += 1
        body = p.error_header(
            code, message, model=self.model, version=self.version, rid=rid, timing=timing
        )
        self.send(key, [p.KIND_REQUEST, key, code.encode(), body])
