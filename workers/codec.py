"""Tensors to and from the wire (see ``router.protocol`` for the frame table).

Decoding wraps the received buffers without copying (``torch.frombuffer``); every
size is checked against the bytes actually present before anything is allocated.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from typing import Any, cast

import msgpack
import numpy as np
import torch

from router import protocol as p
from workers.batching import batch_key
from workers.staging import TensorSpec

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
WIRE_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}

# Outputs up to this size travel inside the header; larger ones get their own frame so
# that ZeroMQ can send them without a copy.
INLINE_LIMIT = 4096

# Received frames are read-only; inference never writes to its inputs, so wrapping them
# read-only is safe and saves a copy. torch warns about it on every call otherwise.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def decode_inputs(header: dict[str, Any], buffers: Sequence[Any]) -> list[torch.Tensor]:
    """Tensors of a request. Raises ProtocolError(BAD_REQUEST) on any inconsistency."""
    specs = header.get("inputs")
    if not isinstance(specs, list) or len(specs) > p.MAX_INPUTS:
        raise p.ProtocolError(p.BAD_REQUEST, f"inputs must be a list of at most {p.MAX_INPUTS}")
    tensors: list[torch.Tensor] = []
    next_frame = 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise p.ProtocolError(p.BAD_REQUEST, f"inputs[{i}] must be a map")
        dtype_name, shape = spec.get("dtype"), spec.get("shape")
        nbytes = p.tensor_nbytes(dtype_name, shape)
        data = spec.get("data")
        if data is None:
            if next_frame >= len(buffers):
                raise p.ProtocolError(p.BAD_REQUEST, f"inputs[{i}] has no data and no frame")
            data = buffers[next_frame]
            next_frame += 1
        elif not isinstance(data, bytes | bytearray | memoryview):
            raise p.ProtocolError(p.BAD_REQUEST, f"inputs[{i}].data must be bytes")
        view = memoryview(data)
        if view.nbytes != nbytes:
            raise p.ProtocolError(
                p.BAD_REQUEST,
                f"inputs[{i}]: {dtype_name} {shape} needs {nbytes} bytes, got {view.nbytes}",
            )
        dtype = TORCH_DTYPES[str(dtype_name)]
        dims = cast(list[int], shape)  # tensor_nbytes checked it: a list of ints
        try:
            if nbytes == 0:
                tensors.append(torch.empty(dims, dtype=dtype))
            else:
                tensors.append(torch.frombuffer(view.cast("B"), dtype=dtype).reshape(dims))
        except (RuntimeError, TypeError, ValueError) as exc:
            # A second net under tensor_nbytes: torch's own limits on a shape (it raises
            # TypeError past int64) must answer this request, not kill the worker.
            why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            msg = f"inputs[{i}]: {dtype_name} {shape}: {why}"
            raise p.ProtocolError(p.BAD_REQUEST, msg) from None
    if next_frame != len(buffers):
        raise p.ProtocolError(
            p.BAD_REQUEST, f"{len(buffers) - next_frame} tensor frames were not referenced"
        )
    return tensors


class RequestLayout:
    """What a request header says, checked once and kept per distinct header bytes.

    Clients send the same header again and again (the same model and input shapes, no
    id or the same one), so the worker decodes and validates a header the first time it
    sees it and afterwards only checks the tensor frames' sizes against it.
    """

    __slots__ = ("bkey", "frame_nbytes", "inline", "layouts", "rid", "signature", "size", "specs")

    def __init__(self, header: dict[str, Any], tensors: Sequence[torch.Tensor]) -> None:
        """``tensors``: what ``decode_inputs`` made of this header (it validated it)."""
        self.rid: Any = header.get("id")
        self.specs = tuple(
            TensorSpec(t.dtype, tuple(t.shape), t.numel() * t.element_size()) for t in tensors
        )
        maps = cast(list[dict[str, Any]], header["inputs"])
        # Per input: its inline bytes (None: its bytes are the next frame).
        self.inline: tuple[Any, ...] = tuple(m.get("data") for m in maps)
        self.frame_nbytes = tuple(
            s.nbytes for s, data in zip(self.specs, self.inline, strict=True) if data is None
        )
        self.size = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
        self.bkey = batch_key(tensors)
        # Per input, what consecutive inputs must share to lie back to back in a batch.
        self.layouts = tuple((s.dtype, s.shape[1:]) if s.shape else None for s in self.specs)
        # (wire dtype, shape) per input: the key of the shapes a worker has served, which
        # the next version warms up with.
        self.signature = tuple((WIRE_DTYPES.get(s.dtype, "float32"), s.shape) for s in self.specs)

    def fits(self, buffers: Sequence[Any]) -> bool:
        """Whether ``buffers`` (the tensor frames) are the ones this header describes."""
        sizes = self.frame_nbytes
        if len(buffers) != len(sizes):
            return False
        if len(sizes) == 1:  # the usual request: one tensor frame
            return len(buffers[0]) == sizes[0]
        return all(len(b) == n for b, n in zip(buffers, sizes, strict=True))

    def sources(self, buffers: Sequence[Any]) -> Sequence[Any]:
        """Each input's bytes: inline from the header, or its frame."""
        if len(buffers) == len(self.inline):
            return buffers  # every input in a frame of its own
        frames = iter(buffers)
        return [next(frames) if data is None else data for data in self.inline]

    def tensors(self, buffers: Sequence[Any]) -> list[torch.Tensor]:
        """The inputs wrapped without a copy (what ``decode_inputs`` returns)."""
        out: list[torch.Tensor] = []
        for spec, data in zip(self.specs, self.sources(buffers), strict=True):
            if spec.nbytes == 0:
                out.append(torch.empty(spec.shape, dtype=spec.dtype))
            else:
                flat = torch.frombuffer(memoryview(data).cast("B"), dtype=spec.dtype)
                out.append(flat.view(spec.shape))
        return out


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_DTYPE_KEY = msgpack.packb("dtype")
_SHAPE_KEY = msgpack.packb("shape")
_DATA_KEY = msgpack.packb("data")
_ID_KEY = msgpack.packb("id")
_WAIT_KEY = msgpack.packb(p.REPLY_WAIT_KEY.decode())
_COMPUTE_KEY = msgpack.packb(p.REPLY_COMPUTE_KEY.decode())
_U32 = struct.Struct(">BI")  # a msgpack uint32: fixed width, cheap to pack and to read
_U32_MAX = (1 << 32) - 1
_EMPTY = np.empty(0, dtype=np.uint8)


class HostOutputs:
    """A forward's outputs on the host, ready to be cut into replies by row range.

    Each output is made contiguous once and viewed as flat bytes; a request's part is a
    slice of those bytes (no torch op per request), inlined in its reply header up to
    ``INLINE_LIMIT`` bytes and sent as a zero-copy frame beyond. Raises TypeError for a
    dtype that has no wire name.
    """

    __slots__ = ("dtype_parts", "flats", "row_bytes", "shapes")

    def __init__(self, outputs: Sequence[torch.Tensor]) -> None:
        self.dtype_parts: list[bytes] = []
        self.flats: list[np.ndarray[Any, Any]] = []
        self.row_bytes: list[int] = []
        self.shapes: list[list[int]] = []
        for t in outputs:
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            name = WIRE_DTYPES.get(t.dtype)
            if name is None:
                raise TypeError(f"output dtype {t.dtype} is not supported on the wire")
            flat = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else _EMPTY
            self.dtype_parts.append(_DTYPE_KEY + msgpack.packb(name))
            self.flats.append(flat)  # the array keeps the tensor's storage alive
            shape = list(t.shape)
            self.shapes.append(shape)
            rows = shape[0] if shape else 1
            self.row_bytes.append(len(flat) // rows if rows else 0)

    def pieces(self, start: int, stop: int | None, items: list[Any], frames: list[Any]) -> None:
        """Append the msgpack tensor maps of rows ``start:stop`` (None: the whole tensors,
        0-d ones included) to ``items``, and their out-of-line bytes to ``frames``."""
        for dtype_part, flat, row_bytes, shape in zip(
            self.dtype_parts, self.flats, self.row_bytes, self.shapes, strict=True
        ):
            if stop is None:
                data = flat
            else:
                data = flat[start * row_bytes : stop * row_bytes]
                shape = [stop - start, *shape[1:]]
            packed_shape = msgpack.packb(shape)
            if len(data) <= INLINE_LIMIT:
                header = _bin_header(len(data))
                items += (b"\x83", dtype_part, _SHAPE_KEY, packed_shape, _DATA_KEY, header, data)
            else:
                items += (b"\x82", dtype_part, _SHAPE_KEY, packed_shape)
                frames.append(data)


def timing_entries(wait_us: int, compute_us: int) -> bytes:
    """The reply header's first two entries, ``wait_us`` and ``compute_us``: where the
    router reads them without walking the header (``router.protocol.REPLY_WAIT_KEY``)."""
    return b"".join(
        (_WAIT_KEY, _U32.pack(0xCE, min(wait_us, _U32_MAX)), _COMPUTE_KEY,
         _U32.pack(0xCE, min(compute_us, _U32_MAX)))
    )  # fmt: skip


class ReplyEncoder:
    """Reply headers of one model version: the fixed keys are packed once.

    The header is the map ``{"wait_us", "compute_us", "ok": true, "model", "version",
    "outputs": [...], "id"}`` built by joining packed pieces, so a reply costs no dict and
    no second copy of its inline bytes. The two timings come first (``timing_entries``).
    """

    def __init__(self, model: str, version: str) -> None:
        fixed = {"ok": True, "model": model, "version": version}
        self.fixed = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in fixed.items())
        self.outputs_key = msgpack.packb("outputs")

    def encode(
        self,
        outputs: HostOutputs,
        start: int,
        stop: int | None,
        rid: Any,
        timing: bytes = b"",
    ) -> tuple[bytes, list[Any]]:
        """Header and frames of the reply carrying rows ``start:stop`` of ``outputs``;
        ``timing``: its first entries, from ``timing_entries`` (or none)."""
        entries = (4 if rid is None else 5) + (2 if timing else 0)
        items: list[Any] = [
            bytes((0x80 | entries,)),
            timing,
            self.fixed,
            self.outputs_key,
            _array_header(len(outputs.flats)),
        ]
        frames: list[Any] = []
        outputs.pieces(start, stop, items, frames)
        if rid is not None:
            items += (_ID_KEY, msgpack.packb(rid))
        return b"".join(items), frames


def encode_outputs(
    outputs: Sequence[torch.Tensor], model: str, version: str, rid: Any
) -> tuple[bytes, list[Any]]:
    """Reply header and the frames of the larger outputs (zero-copy numpy views)."""
    return ReplyEncoder(model, version).encode(HostOutputs(outputs), 0, None, rid)
