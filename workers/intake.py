"""Requests off the wire: decoded, checked, and staged for their batch.

Clients send the same header again and again, so a header is decoded and validated the
first time its bytes are seen and afterwards recognised by them (``RequestLayout``); a
request whose header or frames do not check out is answered with an error at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from router import protocol as p
from workers.codec import RequestLayout, decode_inputs
from workers.pipeline import Pending
from workers.staging import Staged, Stager

# Request headers remembered, already checked: a header longer than this carries inline
# tensor bytes (not worth keeping), and a worker sees few distinct headers unless every
# request has its own id (then the table is cleared whenever it fills up).
MAX_LAYOUT_HEADER = 1024
MAX_LAYOUTS = 256

ReplyError = Callable[[bytes, Any, str, str], None]  # key, request id, code, message


class Intake:
    def __init__(
        self, model: str, expected_inputs: Callable[[], int | None], reply_error: ReplyError
    ) -> None:
        self.model = model
        self.expected_inputs = expected_inputs  # the loaded model's input count, if known
        self.reply_error = reply_error
        self.layouts: dict[bytes, RequestLayout] = {}

    def decode(self, frames: list[Any], stager: Stager | None) -> Pending | None:
        """The request in ``frames`` (kind, key, header, tensor frames), its inputs staged
        when ``stager`` is given; None when it was answered with an error."""
        taken = time.monotonic()
        key = frames[1].bytes
        head = frames[2].bytes
        buffers = [f.buffer for f in frames[3:]]
        layout = self.layouts.get(head)
        tensors: list[torch.Tensor] | None = None
        if layout is None or not layout.fits(buffers):
            decoded = self.parse(key, head, buffers)
            if decoded is None:
                return None
            layout, tensors = decoded
        if stager is None:
            # Staged at launch: the frames themselves, wrapped without a copy.
            inputs: list[Staged] = list(layout.tensors(buffers) if tensors is None else tensors)
            return Pending(key, layout, inputs, taken)
        try:
            # Copied now, while the previous batch runs; the frames can go.
            sources = layout.sources(buffers)
            staged = [
                stager.put(data, spec, lay)
                for data, spec, lay in zip(sources, layout.specs, layout.layouts, strict=True)
            ]
        except Exception as exc:  # no host memory to stage it: this request's answer
            msg = f"{type(exc).__name__}: {exc}"[:2000]
            self.reply_error(key, layout.rid, p.MODEL_ERROR, msg)
            return None
        return Pending(key, layout, staged, taken)

    def parse(
        self, key: bytes, head: bytes, buffers: list[Any]
    ) -> tuple[RequestLayout, list[torch.Tensor]] | None:
        """Decode and check a header not seen before (or frames that do not fit it)."""
        header: dict[str, Any] = {}
        try:
            header = p.unpack_map(head)
            inputs = decode_inputs(header, buffers)
            expected = self.expected_inputs()
            if expected is not None and len(inputs) != expected:
                raise p.ProtocolError(
                    p.BAD_REQUEST,
                    f"model {self.model!r} takes {expected} inputs, got {len(inputs)}",
                )
            layout = RequestLayout(header, inputs)
        except p.ProtocolError as exc:
            self.reply_error(key, header.get("id"), exc.code, exc.message)
            return None
        except Exception as exc:  # whatever the codec missed must not kill the worker
            msg = f"{type(exc).__name__}: {exc}"[:2000]
            self.reply_error(key, header.get("id"), p.BAD_REQUEST, msg)
            return None
        if len(head) <= MAX_LAYOUT_HEADER:
            if len(self.layouts) >= MAX_LAYOUTS:
                self.layouts.clear()  # e.g. a client whose every header has a new id
            self.layouts[head] = layout
        return layout, inputs
