"""Bad input over the wire: every malformed request is answered with the right error code
while well-behaved clients keep being served (issue 2, "Bad input"; issue 4).

One real poold on the CPU (one MLP on two workers) serves four checked client threads for
the whole module; each test throws one kind of bad message at it over raw pyzmq, from a
REQ socket, a DEALER socket with the empty delimiter and a DEALER socket without it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zmq
import zmq.utils.monitor
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import Load, Pool, running_pool

from router import protocol as p
from router.client import Client, Result

SEED = 7
VERSION = "7"
REPLY_TIMEOUT_S = 15.0


# --------------------------------------------------------------------------- fixtures
class Checker:
    """Checks a Load answer against the model run locally (references cached per input)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refs: dict[bytes, np.ndarray] = {}

    def __call__(self, x: np.ndarray, r: Result) -> str | None:
        key = x.tobytes() + bytes(str(x.shape), "ascii")
        with self.lock:
            ref = self.refs.get(key)
            if ref is None:
                ref = self.refs[key] = mlp_reference(SEED, x)
        if r.version != VERSION:
            return f"answered by version {r.version!r}, expected {VERSION!r}"
        if len(r.outputs) != 1 or not np.allclose(r.outputs[0], ref, rtol=1e-5, atol=1e-6):
            return f"wrong answer for input {x.shape}: {r.outputs}"
        return None


def make_input(i: int) -> np.ndarray:
    return mlp_input(1 + i % 3, seed=i % 8)


class Served:
    def __init__(self, pool: Pool, load: Load, pids: set[int]) -> None:
        self.pool = pool
        self.load = load
        self.pids = pids  # the workers at the start: bad input must not kill any

    def assert_healthy(self) -> None:
        assert self.pool.proc.poll() is None, f"poold exited:\n{self.pool.log()[-4000:]}"
        assert not self.load.errors, self.load.errors[:5]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    d = str(tmp_path_factory.mktemp("bad"))
    path = make_mlp(os.path.join(d, "models", "mlp.pt"), seed=SEED)
    model = {
        "name": "mlp",
        "path": path,
        "version": VERSION,
        "devices": ["cpu", "cpu"],
        "max_batch": 8,
        "threads": 1,
    }
    with running_pool(d, [model], max_message_mb=2) as pool:
        pids = {w["pid"] for w in pool.model("mlp")["workers"]}
        assert len(pids) == 2
        with Load(pool.frontend, "mlp", 4, check=Checker(), make_input=make_input) as load:
            load.wait_ok(20)
            yield Served(pool, load, pids)
        assert not load.errors, load.errors[:5]


# ---------------------------------------------------------------------------- helpers
X = mlp_input(2, seed=3)  # float32 [2, 16]


def tensor(x: np.ndarray = X, **over: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"dtype": x.dtype.name, "shape": list(x.shape), "data": x.tobytes()}
    t.update(over)
    return t


def header(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"model": "mlp", "inputs": [tensor()], "id": "bad-1"}
    h.update(over)
    return h


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def pk(obj: Any) -> bytes:
    return msgpack.packb(obj)


def req(h: Any, *frames: bytes) -> list[bytes]:
    return [p.PROTOCOL, pk(h), *frames]


def nested_header(depth: int) -> bytes:
    """{"model": "mlp", "x": [[[...0...]]]} nested ``depth`` deep (msgpack's packer refuses
    to build this, so it is written by hand)."""
    return b"\x82" + pk("model") + pk("mlp") + pk("x") + b"\x91" * depth + b"\x00"


MODES = ("req", "dealer", "dealer-bare")


def ask(
    endpoint: str, frames: list[bytes], mode: str, timeout: float = REPLY_TIMEOUT_S
) -> list[bytes] | None:
    """Send one message over a fresh raw socket; the reply's frames after the envelope,
    or None when nothing came within ``timeout``."""
    sock = zmq.Context.instance().socket(zmq.REQ if mode == "req" else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart([b"", *frames] if mode == "dealer" else frames, copy=False)
        if not sock.poll(int(timeout * 1000)):
            return None
        reply = sock.recv_multipart()
    finally:
        sock.close(linger=0)
    if mode == "dealer" or (mode == "dealer-bare" and reply and reply[0] == b""):
        assert reply[0] == b"", f"DEALER reply lost its delimiter: {reply[:3]}"
        reply = reply[1:]
    return reply


def error_of(reply: list[bytes] | None) -> dict[str, Any]:
    """The reply header of an error reply (asserting that it is one, well formed)."""
    assert reply is not None, "no reply"
    assert reply[0] == p.PROTOCOL, reply[:2]
    hdr = msgpack.unpackb(reply[1], raw=False)
    assert hdr["ok"] is False, hdr
    assert isinstance(hdr["error"]["message"], str) and hdr["error"]["message"], hdr
    assert hdr["error"]["code"] in p.ERROR_CODES, hdr
    assert len(reply) == 2, f"an error reply carries no buffers: {len(reply)} frames"
    return hdr


# ------------------------------------------------------------------------------ cases
# (frames, expected code, whether the reply must echo the request id "bad-1")
Case = tuple[Callable[[], list[bytes]], str, bool]
BAD, PROTO, NOMODEL = p.BAD_REQUEST, p.UNSUPPORTED_PROTOCOL, p.NO_SUCH_MODEL
VALID = pk(header())
FRAME_INPUT = {"dtype": "float32", "shape": [2, 16]}

CASES: dict[str, Case] = {
    # garbage
    "garbage-one-frame": (lambda: [b"\x00\xffthis is not a request"], BAD, False),
    "garbage-two-frames": (lambda: [b"\xde\xad\xbe\xef", b"\x01\x02\x03"], BAD, False),
    "garbage-header": (lambda: [p.PROTOCOL, b"\xc1\xc1\xc1\xc1"], BAD, False),
    "protocol-id-only": (lambda: [p.PROTOCOL], BAD, False),
    "empty-header-frame": (lambda: [p.PROTOCOL, b""], BAD, False),
    # protocol id
    "protocol-gpu-pool-9": (lambda: [b"gpu-pool/9", VALID], PROTO, True),
    "protocol-gpu-pool-0": (lambda: [b"gpu-pool/0", VALID], PROTO, True),
    "protocol-hello": (lambda: [b"hello", VALID], BAD, False),
    "protocol-header-swapped": (lambda: [VALID, p.PROTOCOL], BAD, False),
    # msgpack header
    "truncated-header": (lambda: [p.PROTOCOL, VALID[:-7]], BAD, False),
    "truncated-header-1-byte": (lambda: [p.PROTOCOL, VALID[:1]], BAD, False),
    "header-trailing-bytes": (lambda: [p.PROTOCOL, VALID + b"\x00"], BAD, False),
    "header-list": (lambda: req([1, 2, 3]), BAD, False),
    "header-str": (lambda: req("mlp"), BAD, False),
    "header-int": (lambda: req(7), BAD, False),
    "header-nil": (lambda: req(None), BAD, False),
    "header-int-keys": (lambda: req({1: "mlp"}), BAD, False),
    "header-ext-type": (lambda: req({"model": msgpack.ExtType(5, b"x" * 8)}), BAD, False),
    "header-nested-2000": (lambda: [p.PROTOCOL, nested_header(2000)], BAD, False),
    "header-nested-100000": (lambda: [p.PROTOCOL, nested_header(100_000)], BAD, False),
    "header-str32-claims-4GiB": (
        lambda: [p.PROTOCOL, b"\x81\xa5model\xdb\xff\xff\xff\xff" + b"m" * 8],
        BAD,
        False,
    ),
    "header-array32-claims-4G": (
        lambda: [p.PROTOCOL, b"\x81\xa6inputs\xdd\xff\xff\xff\xff\xc0"],
        BAD,
        False,
    ),
    "header-over-1MiB": (
        lambda: req(header(inputs=[tensor(np.zeros((1 << 18) + 1, np.float32))])),
        BAD,
        False,
    ),
    # model
    "unknown-model": (lambda: req(header(model="no-such-model")), NOMODEL, True),
    "model-missing": (lambda: req(without(header(), "model")), BAD, False),
    "model-int": (lambda: req(header(model=42)), BAD, False),
    "model-empty": (lambda: req(header(model="")), BAD, False),
    "model-bytes": (lambda: req(header(model=b"mlp")), BAD, False),
    "model-too-long": (lambda: req(header(model="m" * 10_000)), BAD, False),
    # timeout_ms and id
    "timeout-negative": (lambda: req(header(timeout_ms=-5)), BAD, False),
    "timeout-zero": (lambda: req(header(timeout_ms=0)), BAD, False),
    "timeout-float": (lambda: req(header(timeout_ms=1.5)), BAD, False),
    "timeout-str": (lambda: req(header(timeout_ms="1000")), BAD, False),
    "timeout-bool": (lambda: req(header(timeout_ms=True)), BAD, False),
    "id-list": (lambda: req(header(id=[1])), BAD, False),
    "id-map": (lambda: req(header(id={"a": 1})), BAD, False),
    "id-float": (lambda: req(header(id=1.5)), BAD, False),
    "id-bool": (lambda: req(header(id=True)), BAD, False),
    "id-too-long": (lambda: req(header(id="i" * 10_000)), BAD, False),
    # inputs
    "inputs-missing": (lambda: req(without(header(), "inputs")), BAD, False),
    "inputs-map": (lambda: req(header(inputs={"0": tensor()})), BAD, False),
    "inputs-str": (lambda: req(header(inputs="x")), BAD, False),
    "input-not-map": (lambda: req(header(inputs=[5])), BAD, True),
    "too-many-inputs": (lambda: req(header(inputs=[tensor()] * 65)), BAD, True),
    "no-inputs": (lambda: req(header(inputs=[])), BAD, True),
    "two-inputs-for-one": (lambda: req(header(inputs=[tensor(), tensor()])), BAD, True),
    # dtype
    "dtype-unknown": (lambda: req(header(inputs=[tensor(dtype="float128")])), BAD, True),
    "dtype-complex64": (lambda: req(header(inputs=[tensor(dtype="complex64")])), BAD, True),
    "dtype-object": (lambda: req(header(inputs=[tensor(dtype="object")])), BAD, True),
    "dtype-int": (lambda: req(header(inputs=[tensor(dtype=4)])), BAD, True),
    "dtype-missing": (lambda: req(header(inputs=[without(tensor(), "dtype")])), BAD, True),
    # shape against bytes
    "shape-needs-more-bytes": (lambda: req(header(inputs=[tensor(shape=[3, 16])])), BAD, True),
    "shape-needs-fewer-bytes": (lambda: req(header(inputs=[tensor(shape=[1, 16])])), BAD, True),
    "bytes-not-whole-items": (
        lambda: req(header(inputs=[tensor(data=X.tobytes()[:-1])])),
        BAD,
        True,
    ),
    "frame-shorter-than-shape": (
        lambda: req(header(inputs=[FRAME_INPUT]), X.tobytes()[:100]),
        BAD,
        True,
    ),
    "shape-missing": (lambda: req(header(inputs=[without(tensor(), "shape")])), BAD, True),
    "shape-str": (lambda: req(header(inputs=[tensor(shape="2x16")])), BAD, True),
    "shape-int": (lambda: req(header(inputs=[tensor(shape=32)])), BAD, True),
    "shape-float-dim": (lambda: req(header(inputs=[tensor(shape=[2.0, 16])])), BAD, True),
    "shape-bool-dim": (lambda: req(header(inputs=[tensor(shape=[True, 32])])), BAD, True),
    "shape-str-dim": (lambda: req(header(inputs=[tensor(shape=["2", 16])])), BAD, True),
    "shape-nested-dim": (lambda: req(header(inputs=[tensor(shape=[[2], 16])])), BAD, True),
    # absurd dimensions
    "dim-negative": (lambda: req(header(inputs=[tensor(shape=[-2, -16])])), BAD, True),
    "dim-negative-one": (lambda: req(header(inputs=[tensor(shape=[-1, 16])])), BAD, True),
    "dim-min-int64": (lambda: req(header(inputs=[tensor(shape=[-(2**63), 16])])), BAD, True),
    "dim-2**40": (lambda: req(header(inputs=[tensor(shape=[2**40, 16])])), BAD, True),
    "dim-max-int64": (lambda: req(header(inputs=[tensor(shape=[2**63 - 1, 16])])), BAD, True),
    "dim-max-uint64": (lambda: req(header(inputs=[tensor(shape=[2**64 - 1])])), BAD, True),
    "dims-product-overflows": (
        lambda: req(header(inputs=[tensor(shape=[2**32, 2**32, 2**32, 2**32])])),
        BAD,
        True,
    ),
    "dim-max-uint64-times-zero": (
        lambda: req(header(inputs=[tensor(shape=[0, 2**64 - 1], data=b"")])),
        BAD,
        True,
    ),
    "dims-2**62-times-zero": (
        lambda: req(header(inputs=[tensor(shape=[0, 2**62, 2**62], data=b"")])),
        BAD,
        True,
    ),
    "too-many-dims": (
        lambda: req(header(inputs=[tensor(shape=[1] * 17, data=b"\0" * 4)])),
        BAD,
        True,
    ),
    "many-dims-huge-shape": (
        lambda: req(header(inputs=[tensor(shape=[2**20] * 16, data=b"")])),
        BAD,
        True,
    ),
    # inline data of the wrong type
    "data-str": (lambda: req(header(inputs=[tensor(data="0" * 128)])), BAD, True),
    "data-int": (lambda: req(header(inputs=[tensor(data=128)])), BAD, True),
    "data-list": (lambda: req(header(inputs=[tensor(data=[0.0] * 32)])), BAD, True),
    "data-map": (lambda: req(header(inputs=[tensor(data={"b": X.tobytes()})])), BAD, True),
    "data-bool": (lambda: req(header(inputs=[tensor(data=True)])), BAD, True),
    # frames
    "referenced-frame-missing": (lambda: req(header(inputs=[FRAME_INPUT])), BAD, True),
    "second-frame-missing": (
        lambda: req(header(inputs=[FRAME_INPUT, FRAME_INPUT]), X.tobytes()),
        BAD,
        True,
    ),
    "unreferenced-extra-frame": (lambda: req(header(), X.tobytes()), BAD, True),
    "unreferenced-extra-frames": (
        lambda: req(header(inputs=[FRAME_INPUT]), X.tobytes(), b"x", b""),
        BAD,
        True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_its_error_code(served: Served, name: str, mode: str) -> None:
    build, code, echo = CASES[name]
    frames = build()
    hdr = error_of(ask(served.pool.frontend, frames, mode))
    assert hdr["error"]["code"] == code, hdr
    if echo:
        assert hdr.get("id") == "bad-1", f"the reply must echo the request id: {hdr}"
    if code == p.BAD_REQUEST and echo:
        assert hdr["model"] == "mlp" and hdr["version"] == VERSION, hdr  # a worker answered
    served.assert_healthy()


@pytest.mark.parametrize("mode", MODES)
def test_valid_raw_requests_between_bad_ones(served: Served, mode: str) -> None:
    """Positive control: the same raw path serves good requests, inline and in frames."""
    for frames in (req(header()), req(header(inputs=[FRAME_INPUT]), X.tobytes())):
        reply = ask(served.pool.frontend, frames, mode)
        assert reply is not None and reply[0] == p.PROTOCOL
        hdr = msgpack.unpackb(reply[1], raw=False)
        assert hdr["ok"] is True, hdr
        assert hdr["version"] == VERSION and hdr["id"] == "bad-1"
        (out,) = hdr["outputs"]
        got = np.frombuffer(out["data"], out["dtype"]).reshape(out["shape"])
        np.testing.assert_allclose(got, mlp_reference(SEED, X), rtol=1e-5, atol=1e-6)


CTL = b"gpu-pool-ctl/1"
CTL_CASES: dict[str, tuple[list[bytes], str]] = {
    "garbage": ([b"\x00\xffgarbage"], "expected"),
    "empty": ([b""], "expected"),
    "wrong-protocol": ([b"", b"gpu-pool-ctl/9", pk({"cmd": "status"})], "expected"),
    "not-msgpack": ([b"", CTL, b"\xc1\xc1"], "not valid msgpack"),
    "truncated": ([b"", CTL, pk({"cmd": "status", "args": {}})[:-3]], "not valid msgpack"),
    "not-a-map": ([b"", CTL, pk(["status"])], "must be a msgpack map"),
    "nested-too-deep": ([b"", CTL, b"\x81\xa3cmd" + b"\x91" * 5000 + b"\xc0"], "msgpack"),
    "extra-frame": ([b"", CTL, pk({"cmd": "status"}), b"x"], "expected"),
    "unknown-command": ([b"", CTL, pk({"cmd": "shutdown"})], "unknown command"),
    "command-not-str": ([b"", CTL, pk({"cmd": ["status"]})], "unknown command"),
    "args-not-map": ([b"", CTL, pk({"cmd": "status", "args": [1]})], "args must be a map"),
    "unknown-model": (
        [b"", CTL, pk({"cmd": "history", "args": {"model": "nope"}})],
        "no model named",
    ),
    "model-not-str": ([b"", CTL, pk({"cmd": "history", "args": {"model": 5}})], "no model named"),
    "upgrade-no-path": (
        [b"", CTL, pk({"cmd": "upgrade", "args": {"model": "mlp"}})],
        "path is required",
    ),
    "upgrade-path-not-str": (
        [b"", CTL, pk({"cmd": "upgrade", "args": {"model": "mlp", "path": 5}})],
        "path must be",
    ),
    "upgrade-path-with-nul": (
        [b"", CTL, pk({"cmd": "upgrade", "args": {"model": "mlp", "path": "/tmp/a\x00.pt"}})],
        "NUL",
    ),
    "upgrade-outside-roots": (
        [b"", CTL, pk({"cmd": "upgrade", "args": {"model": "mlp", "path": "/etc/passwd"}})],
        "outside the allowed model roots",
    ),
    "rollback-nothing-to": (
        [b"", CTL, pk({"cmd": "rollback", "args": {"model": "mlp"}})],
        "no earlier committed version",
    ),
}


@pytest.mark.parametrize("name", list(CTL_CASES))
def test_bad_control_request_gets_an_error_result(served: Served, name: str) -> None:
    frames, says = CTL_CASES[name]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(served.pool.control)
        sock.send_multipart(frames)
        assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), "no answer from the control endpoint"
        reply = sock.recv_multipart()
    finally:
        sock.close(linger=0)
    if reply[0] == b"":
        reply = reply[1:]
    assert reply[0] == CTL and len(reply) == 2, reply
    result = msgpack.unpackb(reply[1], raw=False)
    assert result["type"] == "result" and result["ok"] is False, result
    assert says in result["error"], result
    served.assert_healthy()
    assert served.pool.ctl("status")["ok"] is True


def test_dealer_sending_only_an_empty_frame(served: Served) -> None:
    """A DEALER whose whole message is the empty delimiter still gets an answer: the
    router treats it as an envelope with no body."""
    reply = ask(served.pool.frontend, [], "dealer")
    assert error_of(reply)["error"]["code"] == p.BAD_REQUEST
    served.assert_healthy()


def test_dealer_empty_frames_only(served: Served) -> None:
    reply = ask(served.pool.frontend, [b"", b""], "dealer")
    assert error_of(reply)["error"]["code"] == p.BAD_REQUEST
    served.assert_healthy()


def send_until_dropped(endpoint: str, frames: list[Any]) -> list[bytes] | None:
    """Send ``frames`` from a DEALER and wait (bounded) until the peer drops the connection,
    as libzmq does with a frame over MAXMSGSIZE; then return whatever reply came (None)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames, copy=False)
        assert monitor.poll(20_000), "poold did not drop the connection of an over-size message"
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_DISCONNECTED, event
        return sock.recv_multipart() if sock.poll(500) else None
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


@pytest.mark.slow
def test_frame_over_the_frontend_size_limit(served: Served) -> None:
    """A frame over the frontend's MAXMSGSIZE (pool.max_message_mb, 2 MiB in this pool)
    cannot be answered: libzmq drops the connection after reading the frame's size, before
    allocating it. poold stays up, does not grow, and serves."""
    proc = psutil.Process(served.pool.proc.pid)
    rss_before = proc.memory_info().rss
    big = np.zeros((2 << 20) + 1, np.uint8)
    reply = send_until_dropped(served.pool.frontend, [b"", p.PROTOCOL, VALID, big])
    del big
    assert reply is None, "an over-size message must not be answered"
    served.assert_healthy()
    assert proc.memory_info().rss - rss_before < 64 << 20
    served.load.wait_ok(10)


@pytest.mark.slow
def test_control_message_over_its_size_limit(served: Served) -> None:
    """The control socket's MAXMSGSIZE is 64 KiB: a larger message is dropped unanswered,
    and the control endpoint answers the next caller."""
    msg = pk({"cmd": "status", "pad": "x" * 70_000})
    reply = send_until_dropped(served.pool.control, [b"", b"gpu-pool-ctl/1", msg])
    assert reply is None, "an over-size control message must not be answered"
    served.assert_healthy()
    assert served.pool.ctl("status")["ok"] is True


def test_valid_clients_unharmed_and_workers_alive(served: Served) -> None:
    """After every bad input: the checked clients saw no error, keep being served, and no
    worker died (a retried crash would hide behind a correct answer otherwise)."""
    served.load.wait_ok(50)
    served.assert_healthy()
    assert served.load.ok > 0
    workers = served.pool.model("mlp")["workers"]
    assert {w["pid"] for w in workers} == served.pids, (
        f"workers were replaced: {workers}\n{served.pool.log()[-4000:]}"
    )
    assert all(w["state"] == "ready" for w in workers)
    with Client(served.pool.frontend, retries=1, timeout=10) as c:
        x = mlp_input(4, seed=99)
        r = c.infer("mlp", x)
    assert r.version == VERSION
    np.testing.assert_allclose(r.outputs[0], mlp_reference(SEED, x), rtol=1e-5, atol=1e-6)
    assert "Traceback" not in served.pool.log()
