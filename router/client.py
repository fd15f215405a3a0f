"""The Python client: ``Client(endpoint).infer(model, *inputs, timeout=s)``.

Any language can do the same with a REQ socket and msgpack (see docs/PROTOCOL.md); this
one adds the ZeroMQ guide's lazy-pirate retry: when no reply comes in time it closes the
socket (a REQ socket is stuck after an unanswered send), opens a new one and resends, a
bounded number of times. Inference is idempotent, so a resend is safe.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from router import protocol as p
from router.errors import PoolError, RequestTimeout, from_wire


@dataclass
class Result:
    outputs: list[np.ndarray]
    version: str
    model: str
    id: Any = None
    header: dict[str, Any] = field(default_factory=dict, repr=False)


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


class Client:
    def __init__(
        self,
        endpoint: str,
        *,
        retries: int = 3,
        timeout: float = 30.0,
        context: zmq.Context[Any] | None = None,
        curve_server_key: bytes | None = None,
        curve_keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.retries = retries
        self.timeout = timeout
        self.ctx = context or zmq.Context.instance()
        self.curve_server_key = curve_server_key
        self.curve_keys = curve_keys
        self.sock: zmq.Socket[Any] | None = None

    def _socket(self) -> zmq.Socket[Any]:
        if self.sock is None:
            s = self.ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            if self.curve_server_key is not None and self.curve_keys is not None:
                s.curve_serverkey = self.curve_server_key
                s.curve_publickey, s.curve_secretkey = self.curve_keys
            s.connect(self.endpoint)
            self.sock = s
        return self.sock

    def _reset(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def infer(
        self, model: str, *inputs: Any, timeout: float | None = None, id: Any = None
    ) -> Result:
        """Run ``model.forward(*inputs)`` in the pool; raises a PoolError subclass on error."""
        timeout = self.timeout if timeout is None else timeout
        frames = encode_request(model, inputs, int(timeout * 1000), id)
        # Wait a little past the deadline the pool enforces, so that its
        # DEADLINE_EXCEEDED answer arrives instead of a client-side timeout.
        wait_ms = int((timeout + min(1.0, 0.1 + 0.1 * timeout)) * 1000)
        for _attempt in range(max(1, self.retries)):
            sock = self._socket()
            # A send blocks while no peer can take it (say, a CURVE handshake that the
            # pool refused tore the connection down): bounded by the same wait.
            sock.setsockopt(zmq.SNDTIMEO, wait_ms)
            try:
                sock.send_multipart(frames, copy=False)
            except zmq.Again:
                self._reset()
                continue
            if sock.poll(wait_ms):
                return decode_reply(sock.recv_multipart(copy=False))
            self._reset()  # lazy pirate: a REQ socket without its reply is unusable
        raise RequestTimeout(
            f"no reply from {self.endpoint} after {self.retries} tries of {timeout}s", model=model
        )

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
