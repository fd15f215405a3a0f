"""Child processes of scripts/bench.py, one role each: ``python benchroles.py ROLE JSON``.

Roles that run in the timed path (``client``, ``rep`` with echo work, ``proxy``) import
only pyzmq and msgpack, so 32 of them start in a fraction of a second. Roles that need
torch import it inside the role. Every role prints one JSON line (or ``ready`` lines) on
stdout; errors go to stderr and a non-zero exit.
"""

from __future__ import annotations

import array
import json
import os
import sys
import time
from typing import Any

import msgpack
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROTOCOL = b"gpu-pool/1"  # router.protocol.PROTOCOL; repeated so clients stay import-light
# msgpack of the key "ok" followed by true. A computed answer's header starts with the
# worker's wait_us and compute_us (PROTOCOL.md), so "ok" comes within its first bytes.
OK_ENTRY = b"\xa2ok\xc3"
OK_WITHIN = 48
ITEMSIZE = {"float32": 4, "float16": 2, "uint8": 1, "int64": 8, "float64": 8}


def payload(dtype: str, shape: list[int]) -> bytes:
    """Deterministic tensor bytes: finite values, distinct per element for float32."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * ITEMSIZE[dtype]
    if dtype == "float32":
        unit = array.array("f", [float(i) for i in range(256)]).tobytes()
    elif dtype == "float16":
        unit = b"\x00\x3c"  # 1.0
    else:
        unit = b"\x00"
    reps, tail = divmod(nbytes, len(unit))
    return unit * reps + unit[:tail]


# --------------------------------------------------------------------- client
def client(cfg: dict[str, Any]) -> int:
    """Closed-loop REQ client in the gpu-pool/1 framing, timed between "go" and the end."""
    shape, dtype = cfg["shape"], cfg["dtype"]
    data = payload(dtype, shape)
    header = msgpack.packb(
        {
            "model": cfg["model"],
            "inputs": [{"dtype": dtype, "shape": shape}],
            "timeout_ms": int(cfg.get("timeout_s", 120) * 1000),
        }
    )
    frames = [PROTOCOL, header, data]
    copy = len(data) < 65536  # pyzmq's zero-copy threshold: below it copying is cheaper
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(cfg.get("timeout_s", 120) * 1000))
    sock.connect(cfg["endpoint"])
    for _ in range(max(1, cfg.get("warm", 1))):
        sock.send_multipart(frames, copy=copy)
        first = sock.recv_multipart()
        head = msgpack.unpackb(first[1], raw=False)
        if not head.get("ok"):
            raise SystemExit(f"warm-up request failed: {head.get('error')}")
        if cfg.get("check_identity"):
            out = head["outputs"][0].get("data")
            got = out if out is not None else first[2]
            if bytes(got) != data:
                raise SystemExit("warm-up reply differs from the request (identity model)")
    print("ready", flush=True)
    go = sys.stdin.readline().split()
    if not go or go[0] != "go":
        return 0
    deadline = float(go[1])
    limit = int(cfg.get("requests") or 0)
    least = int(cfg.get("min_requests", 1))
    lat = array.array("d")
    errors, first_error = 0, ""
    # The request is built once as zmq.Frames and resent: libzmq refcounts a resent
    # frame's bytes, so a request costs no copy and none of pyzmq's zero-copy tracking
    # (a thread wake-up per message); plain positional send/recv calls skip pyzmq's
    # send_multipart/recv_multipart layer, whose flag handling costs more than the call.
    proto_frame, head_frame, data_frame = (zmq.Frame(f) for f in frames)
    send, recv, clock = sock.send, sock.recv, time.monotonic
    more = int(zmq.SNDMORE)
    t_start = clock()
    n = 0
    while True:
        a = clock()
        send(proto_frame, more)
        send(head_frame, more)
        send(data_frame, 0)
        recv(0, False)  # the protocol id
        part = recv(0, False)  # the reply header
        tail = part
        while tail.more:  # output frames, if any
            tail = recv(0, False)
        b = clock()
        lat.append(b - a)
        n += 1
        if part.bytes.find(OK_ENTRY, 0, OK_WITHIN) < 0:
            errors += 1
            if not first_error:
                first_error = str(msgpack.unpackb(part.bytes, raw=False).get("error"))
        if limit:
            if n >= limit:
                break
        elif b >= deadline and n >= least:
            break
    t_end = clock()
    with open(cfg["out"], "wb") as f:
        lat.tofile(f)
    print(
        json.dumps(
            {
                "n": n,
                "errors": errors,
                "first_error": first_error,
                "t_start": t_start,
                "t_end": t_end,
            }
        ),
        flush=True,
    )
    sock.close()
    ctx.term()
    return 0


# ------------------------------------------------------------------ references
def proxy(cfg: dict[str, Any]) -> int:
    """C zmq.proxy: ROUTER frontend -> DEALER backend (as in baselines/zmq_bench.py)."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    front.bind(cfg["front"])
    back = ctx.socket(zmq.DEALER)
    back.bind(cfg["back"])
    print("ready", flush=True)
    zmq.proxy(front, back)
    return 0


def rep(cfg: dict[str, Any]) -> int:
    """``n`` REP workers forked from this process; ``work`` is "echo" or "model".

    "model" does what a pool worker does for one request, with the project's own code:
    decode the header and wrap the tensor bytes (workers.codec), run the TorchScript model
    under inference_mode (workers.loader), encode the reply (workers.codec). torch is
    imported once here, before forking, as the pool's spawner does.
    """
    work = cfg["work"]
    if work == "model":
        import torch  # noqa: F401

        import workers.codec  # noqa: F401
        import workers.loader  # noqa: F401
    pids = []
    for _ in range(int(cfg.get("n", 1))):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _rep_child(cfg)
            finally:
                os._exit(code)
        pids.append(pid)
    for _ in pids:
        os.wait()
    return 0


def say_ready() -> None:
    # One write(2) of a short line is atomic on a pipe; print() may split text and newline,
    # and forked siblings share the pipe.
    os.write(1, f"ready {os.getpid()}\n".encode())


def _rep_child(cfg: dict[str, Any]) -> int:
    work = cfg["work"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    if cfg.get("bind"):
        sock.bind(cfg["endpoint"])
    else:
        sock.connect(cfg["endpoint"])
    if work == "model":
        import torch

        from router.protocol import unpack_map
        from workers.codec import decode_inputs, encode_outputs
        from workers.loader import load_model

        torch.set_num_threads(int(cfg.get("threads", 1)))
        model = load_model(cfg["model_path"], "cpu")
        say_ready()
        while True:
            frames = sock.recv_multipart(copy=False)
            header = unpack_map(frames[1].buffer)
            inputs = decode_inputs(header, [f.buffer for f in frames[2:]])
            head, out = encode_outputs(model.forward(inputs), "ref", "ref", header.get("id"))
            sock.send_multipart([PROTOCOL, head, *out], copy=False)
    copy = bool(cfg.get("copy", True))
    say_ready()
    while True:
        parts = sock.recv_multipart(0, copy)
        part = parts[1]
        header = msgpack.unpackb(part if isinstance(part, bytes) else part.bytes, raw=False)
        reply = msgpack.packb(
            {"ok": True, "model": header["model"], "version": "echo", "outputs": header["inputs"]}
        )
        sock.send_multipart([PROTOCOL, reply, *parts[2:]], copy=copy)


# ----------------------------------------------------------------- GPU children
# A fresh interpreter (run with ``python -c``, nothing imported before the clock starts):
# import torch, CUDA init, load, warm up; the phases on stdout as one JSON line.
COLD_CODE = """
import json, sys, time
t0 = time.monotonic()
import torch
t1 = time.monotonic()
cfg = json.loads(sys.argv[1])
dev = torch.device(cfg["device"])
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
if dev.type == "cuda":
    torch.empty(1, device=dev)
    sync()
t2 = time.monotonic()
m = torch.jit.load(cfg["path"], map_location=dev)
sync()
t3 = time.monotonic()
with torch.inference_mode():
    for bs in cfg["batch_sizes"]:
        m(torch.ones(bs, cfg["hidden"], device=dev))
sync()
t4 = time.monotonic()
print(json.dumps({"import_s": t1 - t0, "cuda_init_s": t2 - t1, "load_s": t3 - t2,
                  "warm_s": t4 - t3}), flush=True)
"""


def _sync(torch: Any, dev: Any) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def direct_batch(cfg: dict[str, Any]) -> int:
    """The scripted model called in-process: images/s at each batch size."""
    import torch

    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    m = torch.jit.load(cfg["path"], map_location=dev)
    rows = []
    with torch.inference_mode():
        for bs in cfg["batch_sizes"]:
            x = torch.ones(bs, *cfg["shape"][1:], device=dev, dtype=dtype)
            for _ in range(cfg.get("warm", 10)):
                m(x)
            _sync(torch, dev)
            n, t0 = 0, time.monotonic()
            while True:
                m(x)
                n += 1
                if n % 5 == 0:
                    _sync(torch, dev)
                    if time.monotonic() - t0 >= cfg["seconds"]:
                        break
            dt = time.monotonic() - t0
            rows.append(
                {"batch": bs, "calls": n, "images_per_s": n * bs / dt, "ms_per_batch": dt / n * 1e3}
            )
    print(json.dumps(rows), flush=True)
    return 0


def load_weights(cfg: dict[str, Any]) -> int:
    """torch.jit.load vs workers.loader's safetensors factory format, alternating.

    The safetensors side is ``load_model``, the worker's own call: manifest, factory on
    meta, weights (workers.weights' pinned ring on CUDA), load_state_dict. Both files are
    read once first, so every load comes from the page cache, and each format loads once
    untimed (first-call costs of the process). Device memory goes back between loads, so
    each pays its allocations as a fresh worker would.
    """
    import gc

    import torch

    from workers.loader import load_model

    dev = torch.device(cfg["device"])
    if dev.type == "cuda":
        torch.empty(1, device=dev)  # the context is not part of either load
        torch.cuda.synchronize()
    for path in (cfg["pt"], cfg["st"]):
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    warm = int(cfg.get("warm", 1))
    times: dict[str, list[float]] = {"torchscript": [], "safetensors": []}
    for i in range(warm + cfg["repeats"]):
        for fmt, path in (("torchscript", cfg["pt"]), ("safetensors", cfg["st"])):
            t0 = time.monotonic()
            if fmt == "torchscript":
                m: Any = torch.jit.load(path, map_location=dev)
            else:
                m = load_model(path, dev).module
            _sync(torch, dev)  # copies may still be in flight: the clock stops after them
            if i >= warm:
                times[fmt].append(time.monotonic() - t0)
            nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
            del m
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps({"times": times, "param_bytes": nbytes}), flush=True)
    return 0


ROLES = {
    "client": client,
    "proxy": proxy,
    "rep": rep,
    "direct_batch": direct_batch,
    "load_weights": load_weights,
}

if __name__ == "__main__":
    sys.exit(ROLES[sys.argv[1]](json.loads(sys.argv[2])))
