"""The preloaded spawner: imports torch once, never touches CUDA, forks workers on demand.

A fresh interpreter spends seconds importing torch; a child forked from this process
starts with torch already imported, so a worker's start costs little more than CUDA
init + load + warm-up. The spawner must never initialise CUDA: a forked child cannot
use a CUDA context inherited from its parent.

Talks to poold over stdin/stdout with length-prefixed msgpack maps::

    poold -> spawner   {"t": "spawn", "token": int, "spec": {...WorkerSpec...}}
    spawner -> poold   {"t": "hello", "pid": int, "import_s": float}
                       {"t": "spawned", "token": int, "pid": int}
                       {"t": "exited", "pid": int, "status": int}  (raw waitpid status)

It is the parent of every worker and reaps them (one waitpid loop), reporting each exit.
It exits when poold closes its stdin, or when poold dies (the lifeline pipe).
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack

from workers.heap import freeze_heap

_LEN = struct.Struct("<I")
MAX_COMMAND = 1 << 20


def write_message(fd: int, obj: dict[str, Any]) -> None:
    body = msgpack.packb(obj)
    data = _LEN.pack(len(body)) + body
    while data:
        n = os.write(fd, data)
        data = data[n:]


class MessageReader:
    """Reassembles length-prefixed msgpack maps from a non-blocking byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.buf += data
        out: list[dict[str, Any]] = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if n > MAX_COMMAND:
                raise ValueError(f"message of {n} bytes is over the limit")
            if len(self.buf) < 4 + n:
                break
            obj = msgpack.unpackb(bytes(self.buf[4 : 4 + n]), raw=False)
            del self.buf[: 4 + n]
            if isinstance(obj, dict):
                out.append(obj)
        return out


def child_main(spec: dict[str, Any], keep_fds: set[int]) -> None:
    """In the forked child: become an independent worker, run, and never return."""
    code = 71
    try:
        os.setsid()  # own process group: the supervisor can kill the worker and its children
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.dup2(2, 1)  # stdout is the spawner's protocol pipe; send prints to stderr
        faulthandler.enable()  # SIGABRT from the supervisor (a hung worker) dumps stacks
        for fd in keep_fds:
            os.close(fd)
        from workers.main import WorkerSpec, run

        code = run(WorkerSpec.from_dict(spec))
    except BaseException as exc:  # nothing may unwind into the spawner's loop
        try:
            sys.stderr.write(f"worker {spec.get('wid')}: {type(exc).__name__}: {exc}\n")
        except Exception:
            pass
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, raw wait status) of every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def reap(out_fd: int) -> None:
    for pid, status in reaped():
        write_message(out_fd, {"t": "exited", "pid": pid, "status": status})


# Thread pools that native libraries start at import (OpenBLAS, OpenMP, MKL). A fork
# from a multi-threaded parent can leave a child waiting forever on a lock some other
# thread held, so the spawner imports torch single-threaded and each worker sets its
# own thread count after the fork.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main() -> int:
    t0 = time.monotonic()
    lifeline = int(sys.argv[1]) if len(sys.argv) > 1 else -1
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    for k in THREAD_VARS:
        os.environ[k] = "1"
    import torch  # the point of this process: pay for the import once

    import workers.serve  # noqa: F401  and everything a worker imports after it

    for k, v in saved.items():  # children see the operator's settings again
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:
        sys.stderr.write(f"spawner: {threads} threads after import; forks may be unsafe\n")
    del torch
    freeze_heap()  # children inherit a frozen heap (see workers.heap)

    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
    # poold decides when we stop (stdin EOF or the lifeline), even if a signal reaches
    # its whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write_message(out_fd, {"t": "hello", "pid": os.getpid(), "import_s": time.monotonic() - t0})
    reader = MessageReader()
    watched = [in_fd, wake_r] + ([lifeline] if lifeline >= 0 else [])
    while True:
        try:
            ready, _, _ = select.select(watched, [], [], 1.0)
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        reap(out_fd)
        if lifeline in ready:
            return 0  # poold is gone: the workers see the same lifeline and exit too
        if in_fd in ready:
            data = os.read(in_fd, 65536)
            if not data:
                return 0
            for msg in reader.feed(data):
                if msg.get("t") == "spawn":
                    spec = msg.get("spec") or {}
                    pid = os.fork()
                    if pid == 0:
                        child_main(spec, {in_fd, wake_r, wake_w})
                    write_message(out_fd, {"t": "spawned", "token": msg.get("token"), "pid": pid})


if __name__ == "__main__":
    sys.exit(main())
