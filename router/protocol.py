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

# ---- shared with the C core ------------------------------------------------------------
# Every constant below that router/fastlane.c needs is written here once: the build
# (setup.py, through router/genheader.py) turns the names in C_EXPORTS into
# router/fastlane_protocol.h, and fastlane_load.py refuses a library built from other values.
# Only literals and arithmetic on earlier names: the generator reads this file with ast,
# without importing it (msgpack is not installed while pip builds the package).

# A header is small metadata plus optional inline bytes; anything larger belongs in frames.
MAX_HEADER_BYTES: Final = 1 << 20
# unpack_map's container limits (a frame of n bytes also caps both at n).
MAX_ARRAY_LEN: Final = 4096
MAX_MAP_LEN: Final = 256
# msgpack-python's unpacker keeps 1024 nested containers on its stack, the top map
# included; one more raises StackError. C counts the same way, so deep headers agree.
MAX_NESTING: Final = 1024
# Both are counted in UTF-8 bytes, by C and by Python. A served model's name is at most
# 64 ASCII characters (pool.config_checks); 128 leaves room to answer a longer name with
# NO_SUCH_MODEL, which says what is served, instead of a bare BAD_REQUEST.
MAX_MODEL_NAME_BYTES: Final = 128
MAX_ID_BYTES: Final = 256
# Router <-> worker: a ZeroMQ identity is at most 255 bytes; a version names a file under
# state_dir (pool.config_checks allows 128 characters, all ASCII).
MAX_IDENTITY: Final = 255
MAX_VERSION_BYTES: Final = 128

# The lane (router/fastlane.c "the lane", workers/lane.py): one SOCK_SEQPACKET datagram per
# multipart message. Layout: LANE_WORD-byte little-endian words: the frame count, then each
# frame's length, then the frames back to back.
LANE_WORD: Final = 4
LANE_MAX_BYTES: Final = 64 << 10  # the whole datagram: a socket buffer holds several
LANE_MAX_FRAMES: Final = 64
LANE_PENDING_MAX: Final = 64  # accepted lane connections that have not said who they are

# The ctypes interface of router/fastlane.c. FASTLANE_ABI is bumped whenever a function's
# signature changes, so a stale build is refused, not misused.
FASTLANE_ABI: Final = 6
# A worker's reply header starts with these two keys (microseconds, unsigned ints): how
# long the request waited inside the worker before its batch's compute began, and that
# compute. C reads them there for the latency histograms (router/fastlane.c
# ``reply_timings``); clients may ignore them like any key they do not know.
REPLY_WAIT_KEY: Final = b"wait_us"
REPLY_COMPUTE_KEY: Final = b"compute_us"
# Latency histograms C keeps per worker, in this order: router queue, in-worker wait,
# compute, end to end (fl_worker_stats).
LATENCY_HISTOGRAMS: Final = 4
# What fl_run returns (flags), and what a punted message is.
RUN_PUNTS: Final = 1
RUN_EXTRA: Final = 2
RUN_TIMEOUT: Final = 8
RUN_EINTR: Final = 16
RUN_ERROR: Final = 32
RUN_EXPIRED: Final = 64
PUNT_FRONTEND: Final = 0
PUNT_BACKEND: Final = 1
PUNT_UNREACHABLE: Final = 2
# fl_fail's per-request outcome (ReqInfo.delivered).
DELIVERED: Final = 1
UNDELIVERED: Final = 0
NO_SUCH_REQUEST: Final = -1
# What C tells Python about a request it holds: (field, C type) in struct order; the C
# struct req_info_t and fastlane_abi.ReqInfo are both made from this one table.
REQ_INFO_FIELDS: Final = (
    ("worker", "int"),
    ("model", "int"),
    ("attempts", "int"),
    ("answered", "int"),
    ("whole", "int"),
    ("queued", "int"),
    ("delivered", "int"),
    ("arrived", "double"),
    ("dispatched", "double"),
    ("deadline", "double"),
)

C_EXPORTS: Final = (
    "PROTOCOL",
    "KIND_REQUEST",
    "MAX_HEADER_BYTES",
    "MAX_ARRAY_LEN",
    "MAX_MAP_LEN",
    "MAX_NESTING",
    "MAX_MODEL_NAME_BYTES",
    "MAX_ID_BYTES",
    "MAX_IDENTITY",
    "MAX_VERSION_BYTES",
    "LANE_WORD",
    "LANE_MAX_BYTES",
    "LANE_MAX_FRAMES",
    "LANE_PENDING_MAX",
    "FASTLANE_ABI",
    "REPLY_WAIT_KEY",
    "REPLY_COMPUTE_KEY",
    "LATENCY_HISTOGRAMS",
    "RUN_PUNTS",
    "RUN_EXTRA",
    "RUN_TIMEOUT",
    "RUN_EINTR",
    "RUN_ERROR",
    "RUN_EXPIRED",
    "PUNT_FRONTEND",
    "PUNT_BACKEND",
    "PUNT_UNREACHABLE",
    "DELIVERED",
    "UNDELIVERED",
    "NO_SUCH_REQUEST",
    "REQ_INFO_FIELDS",
)


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
            max_array_len=min(n, MAX_ARRAY_LEN),
            max_map_len=min(n, MAX_MAP_LEN),
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
    if not isinstance(model, str) or not model or len(model.encode()) > MAX_MODEL_NAME_BYTES:
        raise ProtocolError(
            BAD_REQUEST,
            f"header.model must be a non-empty string of at most {MAX_MODEL_NAME_BYTES} bytes",
        )
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
    if isinstance(rid, str):
        rid = rid.encode()  # the limit is in bytes, as C counts it
    return isinstance(rid, bytes) and len(rid) <= MAX_ID_BYTES


def error_header(
    code: str,
    message: str,
    *,
    model: str = "",
    version: str = "",
    rid: Any = None,
    timing: tuple[int, int] | None = None,
) -> bytes:
    """An error reply's header. router/fastlane.c composes the same bytes for requests it
    holds (``compose_error``), from ``error_map`` and what it kept of the request.
    ``timing``: a worker's (wait_us, compute_us) for a batch that raised, the first keys."""
    body: dict[str, Any] = {}
    if timing is not None:
        body[REPLY_WAIT_KEY.decode()], body[REPLY_COMPUTE_KEY.decode()] = timing
    body |= {
        "ok": False,
        "model": model,
        "version": version,
        "error": {"code": code, "message": message},
    }
    if rid is not None:
        body["id"] = rid
    return msgpack.packb(body)


def error_map(code: str, message: str) -> bytes:
    """The packed ``error`` value of an error reply: the template C answers a batch with."""
    return msgpack.packb({"code": code, "message": message})


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
