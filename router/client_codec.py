"""The client's side of the wire: numpy/torch inputs to request frames, reply frames to a
:class:`Result` (docs/PROTOCOL.md has the layout). Shared by the one-host and the
many-host client; imports neither."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from router import protocol as p
from router.errors import PoolError, from_wire


@dataclass
class Result:
    outputs: list[np.ndarray]
    version: str
    model: str
    id: Any = None
    header: dict[str, Any] = field(default_factory=dict, repr=False)
    endpoint: str = ""  # the host that answered


def _as_array(x: Any) -> tuple[str, list[int], Any]:
    """(wire dtype, shape, buffer) of a numpy array or torch tensor, without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        torch = sys.modules["torch"]
        t = x.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in p.DTYPES:
            raise TypeError(f"tensor dtype {t.dtype} is not supported on the wire")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        return name, list(t.shape), raw
    a = np.ascontiguousarray(x)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    name = a.dtype.name
    if name not in p.DTYPES:
        raise TypeError(f"array dtype {a.dtype} is not supported on the wire")
    return name, list(a.shape), a


def encode_request(
    model: str, inputs: tuple[Any, ...], timeout_ms: int | None = None, rid: Any = None
) -> list[Any]:
    specs, frames = [], []
    for x in inputs:
        dtype, shape, buf = _as_array(x)
        specs.append({"dtype": dtype, "shape": shape})
        frames.append(buf)
    header: dict[str, Any] = {"model": model, "inputs": specs}
    if timeout_ms:
        header["timeout_ms"] = timeout_ms
    if rid is not None:
        header["id"] = rid
    return [p.PROTOCOL, msgpack.packb(header), *frames]


def decode_reply(frames: list[Any]) -> Result:
    if len(frames) < 2 or bytes(frames[0]) != p.PROTOCOL:
        raise PoolError("reply is not gpu-pool/1", code=p.INTERNAL)
    header = p.unpack_map(frames[1], limit=1 << 30)
    model, version = str(header.get("model", "")), str(header.get("version", ""))
    if not header.get("ok"):
        raise from_wire(header.get("error"), model, version)
    outputs, nxt = [], 2
    for spec in header.get("outputs", []):
        data = spec.get("data")
        if data is None:
            data = frames[nxt]
            nxt += 1
        outputs.append(_to_numpy(spec["dtype"], spec["shape"], data))
    return Result(outputs, version, model, header.get("id"), header)


def _to_numpy(dtype: str, shape: list[int], data: Any) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: widen exactly to float32
        u16 = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return u16.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def reply_wait_s(timeout: float) -> float:
    """How long to wait for a reply to a request with this deadline: a little past it, so
    that the pool's DEADLINE_EXCEEDED answer arrives instead of a client-side timeout."""
    return timeout + min(1.0, 0.1 + 0.1 * timeout)
