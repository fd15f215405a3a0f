"""The hot standby: a process whose device is already up, waiting to become a worker.

Forked by the spawner ahead of need (``{"t": "standby"}``), it pins its device,
initialises CUDA, creates the cuBLAS handle with one small GEMM, runs a tiny scripted
module (TorchScript's device-side setup), pins the host ring
that ``workers.weights`` streams a safetensors file through, and then waits, holding no
model and no socket to the router: it cannot answer a request because it has no way to
receive one. Its one channel is a socketpair to the spawner, length-prefixed msgpack::

    standby -> spawner   {"t": "standby_ready", "prep_s": float, "reserved": int}
                         {"t": "preloaded", "key": str, "ok": bool, "bytes": int,
                          "load_s": float, "reason": str}  (only with a preload)
    spawner -> standby   {"t": "take", "spec": {...WorkerSpec...}}

With a ``preload`` in its spec (``workers.preload``), it then confines itself and reads
that model into host memory. On "take" it becomes an ordinary worker
(``workers.main.run``) with everything above already paid: the take costs the model's
load (only its copy to the device, when the preload is the version taken) and warm-up.
EOF on the socketpair (the spawner is gone or let it go) and poold's lifeline end it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from workers.exitcodes import EXIT_OK, EXIT_STANDBY_FAILED
from workers.main import WorkerSpec, pin_device, run, watch_lifeline
from workers.preload import Preloaded, preload
from workers.spawner import MessageReader, write_message
from workers.title import set_title

log = logging.getLogger(__name__)

GEMM_SIZE = 256  # big enough that cuBLAS picks a real kernel and allocates its workspace


def prepare(device: str) -> dict[str, Any]:
    """Everything a worker on ``device`` pays before its load, paid now."""
    import torch

    from workers import weights
    from workers.jit_prime import prime_torchscript

    t0 = time.monotonic()
    reserved = 0
    if device.startswith("cuda"):
        dev = torch.device("cuda", 0)  # the only device this process can see
        torch.cuda.init()
        a = torch.rand(8, GEMM_SIZE, device=dev)
        b = torch.rand(GEMM_SIZE, GEMM_SIZE, device=dev)
        torch.nn.functional.linear(a, b)
        torch.cuda.synchronize()
        del a, b
        prime_torchscript(dev)  # the JIT's device-side setup (workers.jit_prime)
        # Pinning costs far more per byte than copying: the ring a load streams through
        # is pinned here, off the critical path.
        weights.reserve_ring()
        reserved = int(torch.cuda.memory_reserved(dev))
    else:
        torch.nn.functional.linear(torch.rand(8, GEMM_SIZE), torch.rand(GEMM_SIZE, GEMM_SIZE))
    return {"prep_s": time.monotonic() - t0, "reserved": reserved}


def read_one(fd: int) -> dict[str, Any] | None:
    """The next message on ``fd`` (blocking); None at EOF."""
    reader = MessageReader()
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        if not data:
            return None
        msgs = reader.feed(data)
        if msgs:
            return msgs[0]


def standby_main(spec: dict[str, Any], conn_fd: int) -> int:
    """In the forked child: prepare the device, wait for a take, then run as a worker."""
    device = str(spec.get("device") or "cpu")
    lifeline = spec.get("lifeline_fd", -1)
    if isinstance(lifeline, int) and lifeline >= 0:
        watch_lifeline(lifeline)
    pin_device(device)
    set_title(f"gpu-pool standby {device} (no model)", "gp:standby")
    try:
        info = prepare(device)
    except Exception as exc:  # a device that cannot come up: poold sees the exit code
        log.error("standby on %s: %s: %s", device, type(exc).__name__, exc)
        return EXIT_STANDBY_FAILED
    say(conn_fd, {"t": "standby_ready", "pid": os.getpid(), **info})
    pre: Preloaded | None = None
    request = spec.get("preload")
    # The preload's thread reports on conn_fd too, but never once it is closed: its
    # number may then be a socket of the worker's.
    conn_lock, conn_open = threading.Lock(), [True]

    def report(msg: dict[str, Any]) -> None:
        with conn_lock:
            if conn_open[0]:
                say(conn_fd, {**msg, "pid": os.getpid()})

    if isinstance(request, dict):
        pre = preload(request, device, report)
    msg = read_one(conn_fd)  # a take sent meanwhile is still in the socket's buffer
    with conn_lock:
        conn_open[0] = False
        os.close(conn_fd)
    if msg is None or msg.get("t") != "take" or not isinstance(msg.get("spec"), dict):
        return EXIT_OK
    wspec = WorkerSpec.from_dict(msg["spec"])
    wspec.from_standby = True
    wspec.lifeline_fd = lifeline if isinstance(lifeline, int) else -1
    return run(wspec, pre)


def say(conn_fd: int, msg: dict[str, Any]) -> None:
    try:
        write_message(conn_fd, msg)
    except OSError:
        pass  # taken while preparing (the spawner closed its end), or the spawner is gone
