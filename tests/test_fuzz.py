"""Property-based fuzzing of everything that reads untrusted bytes (issue 4, "Bad input").

Two halves:

* In-process: ``router.protocol.unpack_map`` / ``route_fields`` and
  ``workers.codec.decode_inputs`` only ever raise ``ProtocolError`` on any input, and never
  allocate more than the message's own size permits.
* Against one real poold (started once for the module): well over 10,000 random and
  mutated messages to the frontend and to the control endpoint, in batches, with valid
  requests interleaved and checked. Every message gets exactly one well-formed answer,
  no worker dies, poold's RSS stays bounded and it serves correctly at the end.

Hypothesis runs derandomized, so CI sees the same messages every time.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import torch
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import Pool, running_pool

from router import protocol as p
from router.client import Client
from workers.codec import TORCH_DTYPES, decode_inputs

SEED = 11
VERSION = "11"
CTL = b"gpu-pool-ctl/1"

# Pool fuzz size: EXAMPLES batches; each drawn message is sent as drawn plus MUTANTS
# mutated copies (cheap to make, while drawing a message costs Hypothesis ~5 ms).
EXAMPLES = 250
FRONT = 16
CTL_PER = 5
MUTANTS = 2
RUNTIME_EXAMPLES = 8  # batches per runtime-management command, beside the mixed ones
MIN_FRONTEND_MESSAGES = 8_000
MIN_TOTAL_MESSAGES = 10_000
RSS_GROWTH_LIMIT = 64 << 20
UNIT_EXAMPLES = 600
BATCH_REPLY_TIMEOUT_S = 20.0

# decode_inputs wraps read-only frames on purpose (workers/codec.py silences this at import,
# but pytest's filterwarnings = error resets the filters for each test).
# A failing batch of ~50 messages has a large repr; Hypothesis warns before printing it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


# ============================================================================ strategies
NASTY_INTS = st.sampled_from(
    [
        0,
        1,
        -1,
        2,
        16,
        2**31 - 1,
        2**31,
        2**32,
        2**40,
        2**62,
        2**63 - 1,
        2**63,
        2**64 - 1,
        -(2**63),
        -(2**31),
    ]
)
INTS = st.integers(-(2**63), 2**64 - 1) | NASTY_INTS
scalars = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(), st.text(max_size=12), st.binary(max_size=24)
)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
GOOD_DTYPES = list(p.DTYPES)
BAD_DTYPES = [
    "float128",
    "complex64",
    "object",
    "",
    "F32",
    "float32\x00",
    "<f4",
    "torch.float32",
    "uint64",
    "str",
    "x" * 200,
]
dtypes = st.one_of(
    st.just("float32"), st.sampled_from(GOOD_DTYPES), st.sampled_from(BAD_DTYPES), anything
)
dims = st.integers(0, 5) | INTS
# Dims whose products overflow int64 or any allocation, 0 included: with a 0 the byte count
# is 0 and the bytes agree, so only a bound on the other dims stops them.
ABSURD_DIMS = [0, 0, 1, 16, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1]
shapes = st.one_of(
    st.integers(0, 4).map(lambda n: [n, 16]),  # what the model takes: some get answered
    st.lists(st.integers(0, 5), max_size=4),
    st.lists(dims, max_size=20),
    st.lists(st.sampled_from(ABSURD_DIMS), min_size=1, max_size=17),
    anything,
)


def fixed_nbytes(dtype: Any, shape: Any) -> int | None:
    """The byte count a well-formed (dtype, shape) implies, when it is small; else None."""
    try:
        n = p.tensor_nbytes(dtype, shape)
    except p.ProtocolError:
        return None
    return n if n <= 4096 else None


@st.composite
def tensor_specs(draw: st.DrawFn) -> tuple[Any, list[bytes]]:
    """A tensor map (often wrong) and the frames it brings along."""
    dtype, shape = draw(dtypes), draw(shapes)
    spec: dict[str, Any] = {"dtype": dtype, "shape": shape}
    if draw(st.integers(0, 9)) == 0:
        spec = {k: v for k, v in spec.items() if draw(st.booleans())}  # drop fields
    exact = fixed_nbytes(dtype, shape)
    how = draw(st.sampled_from(["inline", "frame", "short", "long", "random", "none", "wrong"]))
    frames: list[bytes] = []
    size = exact if exact is not None else draw(st.integers(0, 64))
    if how == "short":
        size = max(0, size - draw(st.integers(1, 8)))
    elif how == "long":
        size += draw(st.integers(1, 8))
    fill = draw(st.binary(min_size=1, max_size=8))  # any bit pattern, NaNs and all
    payload = (fill * (size // len(fill) + 1))[:size]
    if how == "inline" or how in ("short", "long") and draw(st.booleans()):
        spec["data"] = payload
    elif how in ("frame", "short", "long"):
        frames.append(payload)
    elif how == "random":
        spec["data"] = draw(st.binary(max_size=64))
    elif how == "wrong":
        spec["data"] = draw(anything.filter(lambda v: not isinstance(v, bytes)))
    return spec, frames


@st.composite
def request_headers(draw: st.DrawFn) -> tuple[dict[str, Any], list[bytes]]:
    """A request header whose tensors are fuzzed and, in turn, one other field gets a
    wrong-typed or absurd value (all fields at once would rarely get past the router)."""
    bad = draw(
        st.sampled_from(
            [
                "tensors",
                "tensors",
                "tensors",
                "model",
                "inputs",
                "timeout_ms",
                "id",
                "extra",
                "frames",
            ]
        )
    )
    specs = draw(st.lists(tensor_specs(), max_size=3))
    header: dict[str, Any] = {"model": "mlp", "inputs": [s for s, _ in specs]}
    frames = [f for _, fs in specs for f in fs]
    if draw(st.booleans()):
        header["timeout_ms"] = draw(st.integers(1, 60_000))
    if draw(st.booleans()):
        header["id"] = draw(st.text(max_size=16) | st.integers(-(2**63), 2**64 - 1))
    if bad in ("model", "inputs", "timeout_ms", "id"):
        if draw(st.integers(0, 5)) == 0:
            header.pop(bad, None)
        elif bad == "model":
            header[bad] = draw(st.sampled_from(["nope", "", "m" * 129, "MLP"]) | anything)
        elif bad == "id":
            header[bad] = draw(st.text(min_size=257, max_size=300) | INTS | anything)
        else:
            header[bad] = draw(INTS | anything)
    elif bad == "extra":
        header.update(draw(st.dictionaries(st.text(max_size=8), anything, min_size=1, max_size=3)))
    elif bad == "frames":
        if frames and draw(st.booleans()):
            frames.pop(draw(st.integers(0, len(frames) - 1)))
        else:
            frames += draw(st.lists(st.binary(max_size=80), min_size=1, max_size=3))
    return header, frames


def valid_packed(draw: st.DrawFn) -> bytes:
    x = mlp_input(draw(st.integers(1, 3)), seed=draw(st.integers(0, 3)))
    return msgpack.packb(
        {
            "model": "mlp",
            "id": "fz",
            "inputs": [{"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()}],
        }
    )


def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """1-4 byte flips, insertions, deletions or a truncation of ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        i = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = draw(st.sampled_from([0x00, 0xC1, 0xDB, 0xDD, 0xDF, 0xC6, 0xC9, 0xFF, 0x7F]))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete" and buf:
            del buf[i : i + draw(st.integers(1, 6))]
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


CLAIM_PREFIXES = [b"\xdb", b"\xc6", b"\xdd", b"\xdf", b"\xc9"]  # str32 bin32 array32 map32 ext32


def length_claim(draw: st.DrawFn) -> bytes:
    """A msgpack object whose header claims far more bytes or items than follow."""
    prefix = draw(st.sampled_from(CLAIM_PREFIXES))
    n = draw(st.sampled_from([2**32 - 1, 2**31, 2**24, 1 << 20, 65_536]))
    return prefix + n.to_bytes(4, "big") + draw(st.binary(max_size=16))


def nested_bytes(depth: int, leaf: bytes = b"\xc0") -> bytes:
    return b"\x91" * depth + leaf


def claim_or_nest(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return length_claim(draw)
    return nested_bytes(draw(st.integers(500, 20_000)))


def in_map(key: str, raw_value: bytes, rest: dict[str, Any]) -> bytes:
    """A msgpack map {key: <raw value bytes>, **rest}, built by hand around raw bytes."""
    body = b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in rest.items())
    return bytes([0x81 + len(rest)]) + msgpack.packb(key) + raw_value + body


PROTOCOL_IDS = st.sampled_from(
    [
        p.PROTOCOL,
        p.PROTOCOL,
        b"gpu-pool/2",
        b"gpu-pool/",
        b"gpu-pool/1 ",
        b"GPU-POOL/1",
        b"",
        b"hello",
    ]
) | st.binary(max_size=16)
FRONT_KINDS = [
    "random-frames",
    "random-header",
    "truncated",
    "mutated",
    "claim",
    "nested",
    "absurd",
    "structured",
    "structured",
    "structured",
    "structured",
]


@st.composite
def frontend_messages(draw: st.DrawFn) -> list[bytes]:
    # 1 in 100 is a header past MAX_HEADER_BYTES: enough to matter, cheap enough to send.
    kind = "oversized" if draw(st.integers(0, 99)) == 0 else draw(st.sampled_from(FRONT_KINDS))
    if kind == "random-frames":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=6))
    if kind == "random-header":
        return [draw(PROTOCOL_IDS), draw(st.binary(max_size=128))]
    if kind == "truncated":
        packed = valid_packed(draw)
        return [p.PROTOCOL, packed[: draw(st.integers(0, len(packed) - 1))]]
    if kind == "mutated":
        return [draw(PROTOCOL_IDS), mutate(draw, valid_packed(draw))]
    if kind == "claim":
        where = draw(st.sampled_from(["top", "model", "inputs", "id"]))
        raw = length_claim(draw)
        return [p.PROTOCOL, raw if where == "top" else in_map(where, raw, {})]
    if kind == "nested":
        depth = draw(st.integers(100, 20_000))
        key = draw(st.sampled_from(["model", "inputs", "id", "extra"]))
        # with "extra" the rest of the header is valid, so the worker decodes it too
        rest = {} if key == "model" else {"model": "mlp", "inputs": []}
        return [p.PROTOCOL, in_map(key, nested_bytes(depth), rest)]
    if kind == "absurd":  # routes fine; one tensor whose dims are absurd, often with a 0
        shape = draw(st.lists(st.sampled_from(ABSURD_DIMS), min_size=1, max_size=17))
        spec = {"dtype": draw(st.sampled_from(GOOD_DTYPES)), "shape": shape}
        data = draw(st.sampled_from([b"", b"", b"\0" * 8]))
        if draw(st.booleans()):
            return [p.PROTOCOL, msgpack.packb({"model": "mlp", "inputs": [spec]}), data]
        return [p.PROTOCOL, msgpack.packb({"model": "mlp", "inputs": [{**spec, "data": data}]})]
    if kind == "oversized":  # a header past MAX_HEADER_BYTES, or big stray frames
        size = p.MAX_HEADER_BYTES + draw(st.integers(-64, 4096))
        spec = {"dtype": "uint8", "shape": [size], "data": b"\1" * size}
        hdr = {"model": "mlp", "inputs": [spec]}
        return [p.PROTOCOL, msgpack.packb(hdr)]
    header, frames = draw(request_headers())
    proto = p.PROTOCOL if draw(st.integers(0, 9)) else draw(PROTOCOL_IDS)
    return [proto, msgpack.packb(header), *frames]


def mutants(message: list[bytes], rng: random.Random, keep: int = 0) -> list[bytes]:
    """A copy of a multipart message with 1-3 random edits: a frame truncated, bits flipped,
    bytes inserted, a frame dropped, duplicated, swapped or added. Frames before ``keep``
    (an envelope) are left alone."""
    frames = [bytearray(f) for f in message]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(keep, len(frames)) if len(frames) > keep else keep
        op = rng.choice(["truncate", "flip", "flip", "insert", "drop", "dup", "swap", "add"])
        if i >= len(frames):
            frames.append(bytearray(rng.randbytes(rng.randint(0, 16))))
        elif op == "truncate":
            del frames[i][rng.randint(0, len(frames[i])) :]
        elif op == "flip" and frames[i]:
            for _ in range(rng.randint(1, 3)):
                frames[i][rng.randrange(len(frames[i]))] ^= 1 << rng.randrange(8)
        elif op == "insert":
            at = rng.randint(0, len(frames[i]))
            frames[i][at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == "drop" and len(frames) > keep + 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, bytearray(frames[i]))
        elif op == "swap" and len(frames) > keep + 1:
            j = rng.randrange(keep, len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        else:
            frames.insert(rng.randint(keep, len(frames)), bytearray(rng.randbytes(8)))
    return [bytes(f) for f in frames] or [b"x"]


def expand(messages: list[list[bytes]], seed: int, keep: int = 0) -> list[list[bytes]]:
    """Each message followed by MUTANTS mutated copies of it."""
    rng = random.Random(seed)
    return [
        m for msg in messages for m in [msg] + [mutants(msg, rng, keep) for _ in range(MUTANTS)]
    ]


CTL_FIELDS = ["model", "path", "version", "strategy", "timeout_s", "to"]
# Paths an upgrade must refuse. None is a model inside the roots: no upgrade may start.
ctl_paths = st.one_of(
    st.sampled_from(
        [
            "",
            "/",
            ".",
            "..",
            "/etc/passwd",
            "/dev/zero",
            "/proc/self/mem",
            "a\x00b",
            "\x00",
            "/tmp/\x00/x.pt",
            "/etc/passwd\x00.pt",
            "/tmp/../etc/shadow",
            "~",
            "x" * 5000,
            "/" * 300,
            "ipc://x",
            "mlp.pt",
            "../../models/mlp.pt",
        ]
    ),
    st.text(max_size=64),
    anything,
)


# The commands added with runtime management (issue 18). Those that change what the pool
# serves are fuzzed only in ways poold must refuse at once: a model it does not serve
# (unload), devices that fail the config's checks (scale), paths outside the model roots
# (load). One they accepted would change the pool under the test, and answer after the
# status request that ends each batch.
RUNTIME_COMMANDS = ["load", "unload", "scale", "list", "cancel", "describe", "stats"]
NOT_SERVED = st.sampled_from(["nosuch", "", "MLP", "mlp ", " mlp", "mlp\x00", "m" * 200]) | (
    anything.filter(lambda v: v != "mlp")
)
BAD_DEVICES = st.one_of(
    st.sampled_from(
        [[], "cpu", ["gpu:0"], ["cuda:-1"], ["cuda:01"], ["CPU"], [""], [None], [0], ["cpu", 1]]
    ),
    st.lists(
        st.text(max_size=8).filter(lambda d: d != "cpu" and not d.startswith("cuda:")),
        min_size=1,
        max_size=3,
    ),  # fmt: skip
    anything.filter(lambda v: not isinstance(v, list)),
)


@st.composite
def runtime_args(draw: st.DrawFn, cmd: str) -> Any:
    """Plausible arguments for one of RUNTIME_COMMANDS (control_requests may break them)."""
    args: dict[str, Any] = {}
    if cmd == "load":
        args = {"model": draw(st.sampled_from(["mlp", "fz-new"]) | NOT_SERVED)}
        args["path"] = draw(ctl_paths)
        if draw(st.booleans()):
            args["devices"] = draw(st.just(["cpu"]) | BAD_DEVICES)
        if draw(st.booleans()):
            args["max_batch"] = draw(INTS | anything)
        if draw(st.booleans()):
            args["version"] = draw(st.text(max_size=12) | anything)
    elif cmd == "unload":
        args = {"model": draw(NOT_SERVED)}
    elif cmd == "scale":
        args = {"model": draw(st.just("mlp") | NOT_SERVED), "devices": draw(BAD_DEVICES)}
    elif cmd in ("cancel", "describe"):
        args = {"model": draw(st.just("mlp") | NOT_SERVED)}
        if draw(st.booleans()):
            args["uid"] = draw(INTS | anything)
    return args


DEVICE = re.compile(r"cpu|cuda:(0|[1-9][0-9]*)")


def keep_the_pool(cmd: Any, args: Any) -> None:
    """Undo what the random edits may have made valid: unloading the one served model,
    or devices it could be scaled to (see RUNTIME_COMMANDS)."""
    if not isinstance(args, dict):
        return
    if cmd == "unload" and args.get("model") == "mlp":
        args["model"] = "nosuch"
    devices = args.get("devices")
    if cmd == "scale" and isinstance(devices, list) and devices:
        if all(isinstance(d, str) and DEVICE.fullmatch(d) for d in devices):
            args["devices"] = []


COMMANDS = [
    "upgrade",
    "upgrade",
    "upgrade",
    "rollback",
    "rollback",
    "history",
    "status",
    "health",
    "reload",
    *RUNTIME_COMMANDS,
]


@st.composite
def control_requests(draw: st.DrawFn) -> Any:
    """A real command with plausible arguments, one part of which is then made wrong."""
    return draw(control_request_for(draw(st.sampled_from(COMMANDS))))


@st.composite
def control_request_for(draw: st.DrawFn, cmd: Any) -> Any:
    """``cmd`` with plausible arguments, one part of which is then made wrong."""
    args: Any = {"model": "mlp"}
    if cmd in RUNTIME_COMMANDS:
        args = draw(runtime_args(cmd))
    elif cmd == "upgrade":
        args["path"] = draw(ctl_paths)
        if draw(st.booleans()):
            args["version"] = draw(st.text(max_size=12))
        if draw(st.booleans()):
            args["strategy"] = draw(st.sampled_from(["auto", "surge", "drain-first"]))
        if draw(st.booleans()):
            args["timeout_s"] = draw(st.floats(0.1, 600))
    elif cmd == "rollback" and draw(st.booleans()):
        args["to"] = draw(st.text(max_size=12))
    bad = draw(st.sampled_from(["none", "cmd", "args", "extra", *CTL_FIELDS]))
    if bad == "cmd":
        cmd = draw(st.sampled_from(["", "STATUS", "upgrade ", "shutdown", "exec"]) | anything)
    elif bad == "args":
        args = draw(anything)
    elif bad == "extra":
        args.update(draw(st.dictionaries(st.text(max_size=8), anything, min_size=1, max_size=3)))
    elif bad in CTL_FIELDS:
        if draw(st.integers(0, 4)) == 0:
            args.pop(bad, None)
        else:
            args[bad] = draw(st.one_of(INTS, st.floats(), st.text(max_size=30), anything))
    keep_the_pool(cmd, args)
    request = {"cmd": cmd, "args": args}
    if draw(st.integers(0, 9)) == 0:
        del request["args"]  # optional on the wire
    return request


@st.composite
def control_messages(draw: st.DrawFn) -> list[bytes]:
    kind = draw(
        st.sampled_from(
            [
                "random-frames",
                "random-body",
                "mutated",
                "claim",
                "wrong-id",
                "extra-frames",
                "command",
                "command",
                "command",
            ]
        )
    )
    if kind == "random-frames":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=5))
    packed = msgpack.packb(draw(control_requests()))
    if kind == "random-body":
        return [b"", CTL, draw(st.binary(max_size=128))]
    if kind == "mutated":
        return [b"", CTL, mutate(draw, packed)]
    if kind == "claim":
        return [b"", CTL, claim_or_nest(draw)]
    if kind == "wrong-id":
        return [b"", draw(PROTOCOL_IDS), packed]
    if kind == "extra-frames":
        return [b"", CTL, packed, *draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))]
    if draw(st.integers(0, 5)) == 0:
        return [b"", CTL, msgpack.packb(draw(anything))]
    return [b"", CTL, packed]


# ======================================================================= in-process fuzz
@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def peak_during(fn: Any, *args: Any) -> tuple[Any, int]:
    """(result or the ProtocolError raised, peak bytes traced while running fn)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        out: Any = fn(*args)
    except p.ProtocolError as exc:
        out = exc
    return out, tracemalloc.get_traced_memory()[1] - base


@st.composite
def header_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "any", "mutated", "claim", "header"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "any":
        return msgpack.packb(draw(anything))
    if kind == "mutated":
        return mutate(draw, valid_packed(draw))
    if kind == "claim":
        raw = claim_or_nest(draw)
        return raw if draw(st.booleans()) else in_map("inputs", raw, {"model": "mlp"})
    return msgpack.packb(draw(request_headers())[0])


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=UNIT_EXAMPLES)
@given(frame=header_frames())
def test_unpack_map_raises_only_protocol_error_and_allocates_little(frame: bytes) -> None:
    tracemalloc.start()
    try:
        out, peak = peak_during(p.unpack_map, frame)
    finally:
        tracemalloc.stop()
    assert isinstance(out, dict | p.ProtocolError), type(out)
    if isinstance(out, p.ProtocolError):
        assert out.code == p.BAD_REQUEST and out.message
    # Python objects cost more than their msgpack bytes (a 1-byte nested array is a list),
    # but never in proportion to a length the message only claims.
    assert peak <= 128 * len(frame) + (64 << 10), (len(frame), peak)


@pytest.mark.parametrize("prefix", CLAIM_PREFIXES)
def test_unpack_map_length_claims_allocate_nothing(traced: None, prefix: bytes) -> None:
    for where in ("top", "value"):
        raw = prefix + b"\xff\xff\xff\xff" + b"\x00" * 8
        frame = raw if where == "top" else in_map("inputs", raw, {"model": "mlp"})
        out, peak = peak_during(p.unpack_map, frame)
        assert isinstance(out, p.ProtocolError) and out.code == p.BAD_REQUEST
        assert peak < 64 << 10, peak


def test_unpack_map_deep_nesting_is_refused(traced: None) -> None:
    for depth in (2_000, 100_000, 1_000_000):
        out, peak = peak_during(p.unpack_map, in_map("x", nested_bytes(depth), {}))
        assert isinstance(out, p.ProtocolError) and out.code == p.BAD_REQUEST
        assert "StackError" in out.message  # its str() is empty; the message must say why
        assert peak < 1 << 20, peak


def test_unpack_map_refuses_frames_over_its_limit(traced: None) -> None:
    frame = msgpack.packb({"model": "mlp", "pad": b"x" * (p.MAX_HEADER_BYTES + 1)})
    out, peak = peak_during(p.unpack_map, frame)
    assert isinstance(out, p.ProtocolError) and "limit" in out.message
    assert peak < 64 << 10  # refused on its length, before decoding


@settings(FUZZ_SETTINGS, max_examples=UNIT_EXAMPLES)
@given(
    header=st.dictionaries(
        st.sampled_from(["model", "inputs", "timeout_ms", "id"]) | st.text(max_size=6),
        anything | INTS | st.text(max_size=300),
        max_size=6,
    )
    | request_headers().map(lambda hf: hf[0])
)
@pytest.mark.slow
def test_route_fields_raises_only_protocol_error(header: dict[str, Any]) -> None:
    try:
        model, timeout_ms, rid = p.route_fields(header)
    except p.ProtocolError as exc:
        assert exc.code == p.BAD_REQUEST and exc.message
        return
    assert isinstance(model, str) and 0 < len(model.encode()) <= p.MAX_MODEL_NAME_BYTES
    assert timeout_ms is None or (type(timeout_ms) is int and timeout_ms > 0)
    assert rid is None or type(rid) in (int, str, bytes)
    assert isinstance(header["inputs"], list)
    p.error_header(p.BAD_REQUEST, "x", model=model, rid=rid)  # the id can be echoed


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=UNIT_EXAMPLES)
@given(hf=request_headers(), use_wire=st.booleans())
def test_decode_inputs_raises_only_protocol_error(
    hf: tuple[dict[str, Any], list[bytes]], use_wire: bool
) -> None:
    header, frames = hf
    if use_wire:  # through msgpack, as the worker sees it (bytes arrive as bytes)
        header = msgpack.unpackb(msgpack.packb(header), raw=False, strict_map_key=False)
    buffers = [memoryview(f) for f in frames]
    try:
        tensors = decode_inputs(header, buffers)
    except p.ProtocolError as exc:
        assert exc.code == p.BAD_REQUEST and exc.message
        return
    present = sum(len(f) for f in frames) + sum(
        len(s["data"]) for s in header["inputs"] if isinstance(s.get("data"), bytes)
    )
    decoded = sum(t.numel() * t.element_size() for t in tensors)
    assert decoded <= present, "decoded tensors larger than the bytes that arrived"
    assert all(t.untyped_storage().nbytes() <= present for t in tensors)
    assert len(tensors) == len(header["inputs"])


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=UNIT_EXAMPLES)
@given(dtype=dtypes, shape=st.lists(st.sampled_from(ABSURD_DIMS) | INTS, max_size=17) | shapes)
def test_tensor_nbytes_admits_only_shapes_torch_can_build(dtype: Any, shape: Any) -> None:
    """What tensor_nbytes lets through, torch can represent (checked on the meta device,
    which allocates nothing): no dim or stride past int64, whatever zeros hide."""
    try:
        n = p.tensor_nbytes(dtype, shape)
    except p.ProtocolError as exc:
        assert exc.code == p.BAD_REQUEST
        return
    assert n == p.DTYPES[dtype] * math.prod(shape)
    assert math.prod(max(d, 1) for d in shape) <= 1 << 40
    t = torch.empty(shape, dtype=TORCH_DTYPES[dtype], device="meta")
    assert list(t.shape) == shape


@settings(FUZZ_SETTINGS, max_examples=UNIT_EXAMPLES)
@given(
    dtype=st.sampled_from(GOOD_DTYPES),
    shape=st.lists(st.sampled_from(ABSURD_DIMS) | INTS, max_size=17),
    data=st.sampled_from([b"", b"", b"\0" * 8]) | st.binary(max_size=16),
    in_frame=st.booleans(),
)
@pytest.mark.slow
def test_decode_inputs_absurd_shapes(
    dtype: str, shape: list[int], data: bytes, in_frame: bool
) -> None:
    """One tensor, any dims: decoded only when the bytes back it, else ProtocolError."""
    spec: dict[str, Any] = {"dtype": dtype, "shape": shape}
    if not in_frame:
        spec["data"] = data
    try:
        (t,) = decode_inputs({"inputs": [spec]}, [data] if in_frame else [])
    except p.ProtocolError as exc:
        assert exc.code == p.BAD_REQUEST
        return
    assert list(t.shape) == shape and t.numel() * t.element_size() == len(data)


def test_decode_inputs_claimed_shape_allocates_nothing() -> None:
    """A header claiming 2**40 floats with 8 bytes present: refused, nothing allocated
    (a 4 TiB allocation would raise RuntimeError, not ProtocolError)."""
    rss = psutil.Process().memory_info().rss
    cases = [
        ({"dtype": "float32", "shape": [2**40]}, [b"\0" * 8]),
        ({"dtype": "float32", "shape": [2**40], "data": b"\0" * 8}, []),
        ({"dtype": "float64", "shape": [2**20, 2**20]}, [b"\0" * 8]),
        ({"dtype": "uint8", "shape": [2**63 - 1]}, [b"\0" * 8]),
        ({"dtype": "uint8", "shape": [0, 2**64 - 1]}, [b""]),
        ({"dtype": "uint8", "shape": [0, 2**62, 2**62]}, [b""]),
        ({"dtype": "int8", "shape": [0] + [2**40] * 15}, [b""]),
        ({"dtype": "int8", "shape": [-8]}, [b"\0" * 8]),
    ]
    for spec, frames in cases:
        with pytest.raises(p.ProtocolError) as err:
            decode_inputs({"inputs": [spec]}, frames)
        assert err.value.code == p.BAD_REQUEST
    assert psutil.Process().memory_info().rss - rss < 16 << 20


def test_decode_inputs_wraps_frames_without_copying() -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    frame = bytearray(x.tobytes())
    (t,) = decode_inputs({"inputs": [{"dtype": "float32", "shape": [2, 16]}]}, [frame])
    assert t.shape == (2, 16) and torch.equal(t, torch.from_numpy(x))
    assert t.untyped_storage().nbytes() == len(frame)


# ===================================================================== fuzz a real poold
@dataclass
class Tally:
    frontend: int = 0
    control: int = 0
    valid: int = 0
    worker: int = 0  # fuzz messages that got past the router and were answered by a worker
    codes: dict[str, int] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)  # control messages that named one


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = str(tmp_path_factory.mktemp("fuzz"))
    path = make_mlp(os.path.join(d, "models", "mlp.pt"), seed=SEED)
    model = {
        "name": "mlp",
        "path": path,
        "version": VERSION,
        "devices": ["cpu", "cpu"],
        "max_batch": 8,
        "max_delay_ms": 1.0,
        "threads": 1,
    }
    with running_pool(d, [model]) as pl:
        yield pl


VALID_INPUTS = [mlp_input(1 + i % 3, seed=500 + i) for i in range(8)]
VALID_REFS = [mlp_reference(SEED, x) for x in VALID_INPUTS]


def valid_request(n: int) -> list[bytes]:
    x = VALID_INPUTS[n % len(VALID_INPUTS)]
    spec = {"dtype": "float32", "shape": list(x.shape)}
    if n % 2:
        return [
            p.PROTOCOL,
            msgpack.packb(
                {"model": "mlp", "id": f"valid-{n}", "inputs": [{**spec, "data": x.tobytes()}]}
            ),
        ]
    return [
        p.PROTOCOL,
        msgpack.packb({"model": "mlp", "id": f"valid-{n}", "inputs": [spec]}),
        x.tobytes(),
    ]


def check_valid_reply(hdr: dict[str, Any], frames: list[bytes]) -> None:
    n = int(hdr["id"].removeprefix("valid-"))
    assert hdr["ok"] is True, f"a valid request failed between fuzz messages: {hdr}"
    assert hdr["version"] == VERSION and hdr["model"] == "mlp", hdr
    (out,) = hdr["outputs"]
    data = out["data"] if "data" in out else frames[0]
    got = np.frombuffer(data, out["dtype"]).reshape(out["shape"])
    np.testing.assert_allclose(got, VALID_REFS[n % len(VALID_REFS)], rtol=1e-5, atol=1e-6)


FUZZ_CODES_ALLOWED = {
    p.BAD_REQUEST,
    p.UNSUPPORTED_PROTOCOL,
    p.NO_SUCH_MODEL,
    p.MODEL_ERROR,
    p.DEADLINE_EXCEEDED,
}


def collect(sock: zmq.Socket[Any], n: int, what: str, deadline: float) -> list[list[bytes]]:
    """Exactly ``n`` messages from ``sock`` (leading empty delimiter removed), polling in
    short steps; fails when they do not all come before ``deadline``."""
    got: list[list[bytes]] = []
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"{what}: {len(got)} of {n} replies arrived"
        if sock.poll(int(min(left, 0.25) * 1000)):
            msg = sock.recv_multipart()
            got.append(msg[1:] if msg and msg[0] == b"" else msg)
    return got


def sent_command(frames: list[bytes]) -> str | None:
    """The command a control message names, when it is well-formed enough to say."""
    if len(frames) != 3 or frames[1] != CTL:
        return None
    try:
        body = msgpack.unpackb(frames[2], raw=False)
    except Exception:
        return None
    cmd = body.get("cmd") if isinstance(body, dict) else None
    return cmd if isinstance(cmd, str) else None


def fuzz_batch(
    pl: Pool,
    tally: Tally,
    front: list[list[bytes]],
    ctl: list[list[bytes]],
    delimit: list[bool],
    valid_at: int,
) -> None:
    ctx = zmq.Context.instance()
    fs, cs = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        for s, ep in ((fs, pl.frontend), (cs, pl.control)):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
        first = tally.valid
        sent = 0
        for i, frames in enumerate(front):
            if i == valid_at or i == len(front) // 2 + valid_at // 2:
                fs.send_multipart([b"", *valid_request(tally.valid)])
                tally.valid += 1
                sent += 1
            fs.send_multipart([b"", *frames] if delimit[i % len(delimit)] else frames)
            sent += 1
        for frames in ctl:
            cs.send_multipart(frames)
            cmd = sent_command(frames)
            if cmd is not None:
                tally.commands[cmd] = tally.commands.get(cmd, 0) + 1
        cs.send_multipart([b"", CTL, msgpack.packb({"cmd": "status"})])
        deadline = time.monotonic() + BATCH_REPLY_TIMEOUT_S
        replies = collect(fs, sent, "frontend", deadline)
        results = []
        while len(results) < len(ctl) + 1:  # progress messages may precede a result
            (msg,) = collect(cs, 1, f"control ({len(results)} of {len(ctl) + 1} results)", deadline)
            assert msg[0] == CTL and len(msg) == 2, msg[:3]
            body = msgpack.unpackb(msg[1], raw=False)
            assert body["type"] in ("progress", "result"), body
            if body["type"] == "result":
                results.append(body)
    finally:
        fs.close(linger=0)
        cs.close(linger=0)
    tally.frontend += len(front)
    tally.control += len(ctl)
    valid_seen = 0
    for reply in replies:
        assert reply[0] == p.PROTOCOL and len(reply) >= 2, reply[:3]
        hdr = p.unpack_map(reply[1], limit=1 << 30)
        assert isinstance(hdr.get("ok"), bool), hdr
        if isinstance(hdr.get("id"), str) and hdr["id"].startswith("valid-"):
            check_valid_reply(hdr, reply[2:])
            valid_seen += 1
            continue
        if hdr.get("version") == VERSION:
            tally.worker += 1
        if not hdr["ok"]:
            code = hdr["error"]["code"]
            assert code in FUZZ_CODES_ALLOWED, f"fuzz message answered {code}: {hdr}"
            tally.codes[code] = tally.codes.get(code, 0) + 1
        else:
            tally.codes["ok"] = tally.codes.get("ok", 0) + 1
    assert valid_seen == tally.valid - first, "a valid request's reply went missing"
    status = results[-1]  # one socket, answered in order: the status request was last
    for r in results[:-1]:
        assert isinstance(r["ok"], bool) and (r["ok"] or r.get("error")), r
    assert status["ok"] is True and status["data"]["models"][0]["name"] == "mlp", status


@pytest.mark.slow
def test_fuzz_frontend_and_control(pool: Pool) -> None:
    proc = psutil.Process(pool.proc.pid)
    pids = {w["pid"] for w in pool.model("mlp")["workers"]}
    tally = Tally()
    with Client(pool.frontend, retries=1, timeout=10) as c:  # settle allocators first
        for x in VALID_INPUTS * 4:
            c.infer("mlp", x)
    rss_before = proc.memory_info().rss
    started = time.monotonic()

    # No shrinking: a failing batch is reported as generated (shrinking against a live
    # daemon would take longer than the test's time limit).
    @settings(FUZZ_SETTINGS, max_examples=EXAMPLES, phases=[Phase.explicit, Phase.generate])
    @given(
        front=st.lists(frontend_messages(), min_size=FRONT, max_size=FRONT),
        ctl=st.lists(control_messages(), min_size=CTL_PER, max_size=CTL_PER),
        delimit=st.lists(st.booleans(), min_size=1, max_size=8),
        valid_at=st.integers(0, FRONT * (MUTANTS + 1) - 1),
        seed=st.integers(0, 2**32 - 1),
    )
    def run(
        front: list[list[bytes]],
        ctl: list[list[bytes]],
        delimit: list[bool],
        valid_at: int,
        seed: int,
    ) -> None:
        assert pool.proc.poll() is None, f"poold exited:\n{pool.log()[-4000:]}"
        fuzz_batch(pool, tally, expand(front, seed), expand(ctl, seed, keep=1), delimit, valid_at)

    # Hypothesis favours small examples and a load's arguments are the largest, so left to
    # the draw above one command may be named once in a run: each gets its own pass too.
    def runtime_pass(cmd: str) -> None:
        @settings(FUZZ_SETTINGS, max_examples=RUNTIME_EXAMPLES, phases=[Phase.generate])
        @given(request=control_request_for(cmd), seed=st.integers(0, 2**32 - 1))
        def one(request: Any, seed: int) -> None:
            assert pool.proc.poll() is None, f"poold exited:\n{pool.log()[-4000:]}"
            ctl = expand([[b"", CTL, msgpack.packb(request)]], seed, keep=1)
            fuzz_batch(pool, tally, [], ctl, [True], 0)

        one()

    run()
    for cmd in RUNTIME_COMMANDS:
        runtime_pass(cmd)
    elapsed = time.monotonic() - started
    print(
        f"\nfuzz: {tally.frontend} frontend + {tally.control} control messages, "
        f"{tally.valid} valid, {tally.worker} answered by a worker, {elapsed:.1f}s; "
        f"answers {tally.codes}; commands {tally.commands}; "
        f"poold RSS {rss_before >> 20} -> {proc.memory_info().rss >> 20} MiB"
    )
    assert tally.frontend >= MIN_FRONTEND_MESSAGES
    assert tally.frontend + tally.control >= MIN_TOTAL_MESSAGES
    assert tally.codes.get(p.BAD_REQUEST, 0) > tally.frontend // 2  # most were refused
    assert tally.worker > tally.frontend // 25  # and enough reached a worker's decoder
    for cmd in RUNTIME_COMMANDS:  # every new command was fuzzed, and answered (fuzz_batch)
        assert tally.commands.get(cmd, 0) >= 5, (cmd, tally.commands)
    assert pool.proc.poll() is None
    growth = proc.memory_info().rss - rss_before
    assert growth < RSS_GROWTH_LIMIT, f"poold grew {growth >> 20} MiB"
    workers = pool.model("mlp")["workers"]
    assert {w["pid"] for w in workers} == pids, f"workers died: {workers}\n{pool.log()[-4000:]}"
    with Client(pool.frontend, retries=1, timeout=10) as c:
        r = c.infer("mlp", VALID_INPUTS[0])
    assert r.version == VERSION
    np.testing.assert_allclose(r.outputs[0], VALID_REFS[0], rtol=1e-5, atol=1e-6)
    assert "Traceback" not in pool.log()
