"""gpu-pool wire protocol, version 1: the one module that defines frames and codes.

Client <-> frontend (a ZeroMQ REQ socket adds and strips the empty delimiter itself)::

    request                               reply
    +-----+----------------------------+  +-----+------------------------------------+
    |  0  | b"gpu-pool/1"  protocol id |  |  0  | b"gpu-pool/1"                      |
    |  1  | msgpack header (map)       |  |  1  | msgpack header (map)               |
    | 2.. | raw tensor bytes, one      |  | 2.. | raw output bytes, one frame per    |
    |     | frame per input without    |  |     | output without inline "data"       |
    |     | inline "data", in order    |  |     |                                    |
    +-----+----------------------------+  +-----+------------------------------------+

Request header keys: ``model`` (str, required), ``inputs`` (list of tensor maps, required),
``timeout_ms`` (int, optional), ``id`` (str/int, optional, echoed in the reply).
A tensor map is ``{"dtype": str, "shape": [int, ...], "data": bin}``; without ``data``
its bytes are the next unused frame. Bytes are C-contiguous and little-endian.

Reply header keys: ``ok`` (bool), ``model`` (str), ``version`` (str: the version that
computed the answer, "" when none did), ``outputs`` (list of tensor maps) when ok,
``error`` (``{"code": str, "message": str}``) when not, ``id`` when the request had one.

Minor revisions only add optional keys; receivers ignore keys they do not know. A change
that breaks either rule gets a new protocol id (``gpu-pool/2``).

Router <-> worker (internal, over an ipc ROUTER/DEALER pair; the router prepends the
worker identity)::

    b"R", request id (8 bytes), client header frame, *client buffers    router -> worker
    b"R", request id, reply header frame, *output buffers               worker -> router
    b"C", msgpack control map {"t": "stop" | ...}                       router -> worker
    b"E", msgpack event map {"t": "hello" | "ready" | "hb" | "failed" | "bye", ...}
                                                                        worker -> router

The router reads only the client's header (model, deadline, id); tensor bytes are
forwarded as the frames they arrived in and decoded by the worker alone.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

PROTOCOL: Final = b"gpu-pool/1"
PROTOCOL_PREFIX: Final = b"gpu-pool/"

# Router <-> worker frame kinds.
KIND_REQUEST: Final = b"R"
KIND_CONTROL: Final = b"C"
KIND_EVENT: Final = b"E"

# Stable error codes: clients switch on these strings, so they never change meaning.
BAD_REQUEST: Final = "BAD_REQUEST"
UNSUPPORTED_PROTOCOL: Final = "UNSUPPORTED_PROTOCOL"
NO_SUCH_MODEL: Final = "NO_SUCH_MODEL"
MODEL_UNAVAILABLE: Final = "MODEL_UNAVAILABLE"
OVERLOADED: Final = "OVERLOADED"
DEADLINE_EXCEEDED: Final = "DEADLINE_EXCEEDED"
WORKER_LOST: Final = "WORKER_LOST"
MODEL_ERROR: Final = "MODEL_ERROR"
SHUTTING_DOWN: Final = "SHUTTING_DOWN"
INTERNAL: Final = "INTERNAL"

ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNSUPPORTED_PROTOCOL,
        NO_SUCH_MODEL,
        MODEL_UNAVAILABLE,
        OVERLOADED,
        DEADLINE_EXCEEDED,
        WORKER_LOST,
        MODEL_ERROR,
        SHUTTING_DOWN,
        INTERNAL,
    }
)

# Supported tensor dtypes: wire name -> (numpy name or None, item size in bytes).
# bfloat16 has no numpy dtype; clients receive it widened to float32.
DTYPES: Final[dict[str, int]] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
}

MAX_DIMS: Final = 16
MAX_INPUTS: Final = 64
# A header is small metadata plus optional inline bytes; anything larger belongs in frames.
MAX_HEADER_BYTES: Final = 1 << 20
MAX_ID_LEN: Final = 256
MAX_MODEL_NAME: Final = 128


class ProtocolError(Exception):
    """A message that cannot be served; ``code`` is the wire error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unpack_map(frame: bytes | memoryview, limit: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a msgpack map with explicit limits, so no decode allocates beyond the frame."""
    if len(frame) > limit:
        raise ProtocolError(BAD_REQUEST, f"header is {len(frame)} bytes, limit {limit}")
    n = len(frame)
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=min(n, 4096),
            max_map_len=min(n, 256),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        why = str(exc) or type(exc).__name__  # StackError (nested too deep) has no text
        raise ProtocolError(BAD_REQUEST, f"header is not valid msgpack: {why}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "header must be a msgpack map")
    return obj


def check_protocol(frame: bytes) -> None:
    if frame != PROTOCOL:
        if frame.startswith(PROTOCOL_PREFIX):
            raise ProtocolError(
                UNSUPPORTED_PROTOCOL,
                f"protocol {frame[:32]!r} is not supported; this server speaks {PROTOCOL!r}",
            )
        raise ProtocolError(BAD_REQUEST, f"first frame must be the protocol id {PROTOCOL!r}")


def route_fields(header: dict[str, Any]) -> tuple[str, int | None, Any]:
    """What the router needs from a request header: (model, timeout_ms, id)."""
    model = header.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
        raise ProtocolError(BAD_REQUEST, "header.model must be a non-empty string")
    timeout = header.get("timeout_ms")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0
    ):
        raise ProtocolError(BAD_REQUEST, "header.timeout_ms must be a positive integer")
    rid = header.get("id")
    if rid is not None and not _valid_id(rid):
        raise ProtocolError(BAD_REQUEST, "header.id must be a short string or an integer")
    if not isinstance(header.get("inputs"), list):
        raise ProtocolError(BAD_REQUEST, "header.inputs must be a list of tensors")
    return model, timeout, rid


def _valid_id(rid: object) -> bool:
    if isinstance(rid, bool):
        return False
    if isinstance(rid, int):
        return -(1 << 63) <= rid < (1 << 64)
    return isinstance(rid, str | bytes) and len(rid) <= MAX_ID_LEN


def error_header(
    code: str, message: str, *, model: str = "", version: str = "", rid: Any = None
) -> bytes:
    body: dict[str, Any] = {
        "ok": False,
        "model": model,
        "version": version,
        "error": {"code": code, "message": message},
    }
    if rid is not None:
        body["id"] = rid
    return msgpack.packb(body)


def tensor_nbytes(dtype: object, shape: object) -> int:
    """Validate a tensor's dtype and shape; return the byte count they imply."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(BAD_REQUEST, f"unknown dtype {str(dtype)[:32]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(BAD_REQUEST, f"shape must be a list of at most {MAX_DIMS} dims")
    n = DTYPES[dtype]
    extent = 1  # product of the non-zero dims: bounded even when a zero makes n == 0,
    for dim in shape:  # so torch never sees a dim or stride past int64 (it raises TypeError)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise ProtocolError(BAD_REQUEST, f"shape dims must be non-negative ints: {shape}")
        n *= dim
        extent *= max(dim, 1)
        if extent > 1 << 40:  # Python ints never overflow; stop absurd products early
            raise ProtocolError(BAD_REQUEST, f"shape {shape[:MAX_DIMS]} is absurdly large")
    return n
