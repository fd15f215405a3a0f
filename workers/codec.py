"""Tensors to and from the wire (see ``router.protocol`` for the frame table).

Decoding wraps the received buffers without copying (``torch.frombuffer``); every
size is checked against the bytes actually present before anything is allocated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, cast

import msgpack
import torch

from router import protocol as p

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


def encode_outputs(
    outputs: Sequence[torch.Tensor], model: str, version: str, rid: Any
) -> tuple[bytes, list[Any]]:
    """Reply header and the frames of the larger outputs (zero-copy numpy views)."""
    maps: list[dict[str, Any]] = []
    frames: list[Any] = []
    for t in outputs:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = WIRE_DTYPES.get(t.dtype)
        if name is None:
            raise TypeError(f"output dtype {t.dtype} is not supported on the wire")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        entry: dict[str, Any] = {"dtype": name, "shape": list(t.shape)}
        if len(raw) <= INLINE_LIMIT:
            entry["data"] = bytes(raw)
        else:
            frames.append(raw)  # the numpy array keeps the tensor's storage alive
        maps.append(entry)
    body: dict[str, Any] = {"ok": True, "model": model, "version": version, "outputs": maps}
    if rid is not None:
        body["id"] = rid
    return msgpack.packb(body), frames
