"""The preloaded spawner: imports torch once, never touches CUDA, forks workers on demand.

A fresh interpreter spends seconds importing torch; a child forked from this process
starts with torch already imported, so a worker's start costs little more than CUDA
init + load + warm-up. The spawner must never initialise CUDA: a forked child cannot
use a CUDA context inherited from its parent.

Talks to poold over stdin/stdout with length-prefixed msgpack maps::

    poold -> spawner   {"t": "spawn", "token": int, "spec": {...WorkerSpec...}}
                       {"t": "standby", "token": int, "spec": {"device", "lifeline_fd",
                        "preload"?}}  (workers.preload)
                       {"t": "take", "token": int, "pid": int | None, "standby": int,
                        "spec": {...WorkerSpec...}}  (pid, or the token of its fork)
    spawner -> poold   {"t": "hello", "pid": int, "import_s": float}
                       {"t": "spawned", "token": int, "pid": int}
                       {"t": "took", "token": int, "pid": int, "standby": bool}
                       {"t": "standby_ready", "pid": int, "prep_s": float, "reserved": int}
                       {"t": "preloaded", "pid": int, "key": str, "ok": bool, ...}
                       {"t": "exited", "pid": int, "status": int}  (raw waitpid status)

A standby (``workers.standby``) is a child that prepared its device and waits on a
socketpair to this process. "take" hands it a worker's spec; when that standby is gone
(it died, or was never there) the spawner forks a fresh worker instead, so a take
always yields a worker. "took" says which it was, before the usual "spawned".

It is the parent of every worker and reaps them (one waitpid loop), reporting each exit.
It exits when poold closes its stdin, or when poold dies (the lifeline pipe).
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import socket
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


def child_main(spec: dict[str, Any], keep_fds: set[int], conn_fd: int = -1) -> None:
    """In the forked child: become an independent worker (or, with ``conn_fd``, a
    standby talking on that socket), run, and never return."""
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
        if conn_fd >= 0:
            from workers.standby import standby_main

            code = standby_main(spec, conn_fd)
        else:
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


def fork_worker(spec: dict[str, Any], close_fds: set[int]) -> int:
    pid = os.fork()
    if pid == 0:
        child_main(spec, close_fds)
    return pid


class Standbys:
    """The standbys this spawner forked: pid -> its end of their socketpair."""

    def __init__(self, out_fd: int) -> None:
        self.out_fd = out_fd
        self.conns: dict[int, socket.socket] = {}
        self.readers: dict[int, MessageReader] = {}
        self.forked: dict[Any, int] = {}  # poold's token of each standby fork -> pid

    def fds(self) -> list[int]:
        return [c.fileno() for c in self.conns.values()]

    def all_fds(self) -> set[int]:
        return set(self.fds())

    def fork(self, spec: dict[str, Any], close_fds: set[int], token: Any) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            ours.close()
            child_main(spec, close_fds | self.all_fds(), theirs.detach())
        theirs.close()
        self.conns[pid] = ours
        self.readers[pid] = MessageReader()
        self.forked[token] = pid
        return pid

    def take(self, pid: Any, token: Any, spec: dict[str, Any]) -> int | None:
        """Hand ``spec`` to standby ``pid`` (or the one forked for ``token``); its pid,
        or None when it cannot take it."""
        known = self.forked.pop(token, None)
        pid = pid if isinstance(pid, int) else known
        conn = self.conns.pop(pid, None) if isinstance(pid, int) else None
        self.readers.pop(pid, None)
        if conn is None:
            return None
        try:
            body = msgpack.packb({"t": "take", "spec": spec})
            conn.sendall(_LEN.pack(len(body)) + body)
            return int(pid)
        except OSError:
            return None  # it died: its exit is on its way through the reaper
        finally:
            conn.close()

    def read(self, ready: list[int]) -> None:
        for pid, conn in list(self.conns.items()):
            if conn.fileno() not in ready:
                continue
            try:
                data = conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:  # it exited; the reaper reports how
                self.conns.pop(pid).close()
                self.readers.pop(pid, None)
                self.forked = {t: p for t, p in self.forked.items() if p != pid}
                continue
            for msg in self.readers[pid].feed(data):
                if msg.get("t") in ("standby_ready", "preloaded"):
                    write_message(self.out_fd, {**msg, "pid": pid})


# Thread pools that native libraries start at import (OpenBLAS, OpenMP, MKL). A fork
# from a multi-threaded parent can leave a child waiting forever on a lock some other
# thread held, so the spawner imports torch single-threaded and each worker sets its
# own thread count after the fork.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def main() -> int:
    t0 = time.monotonic()
    lifeline = int(sys.argv[1]) if len(sys.argv) > 1 else -1
    from workers.title import set_title

    set_title("gpu-pool spawner (imports torch, forks workers)", "gp:spawner")
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    for k in THREAD_VARS:
        os.environ[k] = "1"
    import torch  # the point of this process: pay for the import once

    import workers.serve  # noqa: F401  and everything a worker imports after it
    from workers.jit_prime import prime_torchscript

    prime_torchscript()  # every child inherits the JIT's one-time setup (workers.jit_prime)

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
    standbys = Standbys(out_fd)
    own = {in_fd, wake_r, wake_w}
    while True:
        watched = [in_fd, wake_r] + ([lifeline] if lifeline >= 0 else []) + standbys.fds()
        try:
            ready, _, _ = select.select(watched, [], [], 1.0)
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
        reap(out_fd)
        if lifeline in ready:
            return 0  # poold is gone: the workers see the same lifeline and exit too
        standbys.read(ready)
        if in_fd in ready:
            data = os.read(in_fd, 65536)
            if not data:
                return 0
            for msg in reader.feed(data):
                kind, token = msg.get("t"), msg.get("token")
                raw = msg.get("spec")
                spec: dict[str, Any] = raw if isinstance(raw, dict) else {}
                if kind == "spawn":
                    pid = fork_worker(spec, own | standbys.all_fds())
                elif kind == "standby":
                    pid = standbys.fork(spec, own, token)
                elif kind == "take":
                    taken = standbys.take(msg.get("pid"), msg.get("standby"), spec)
                    pid = taken or fork_worker(spec, own | standbys.all_fds())
                    write_message(
                        out_fd, {"t": "took", "token": token, "pid": pid, "standby": bool(taken)}
                    )
                else:
                    continue
                write_message(out_fd, {"t": "spawned", "token": token, "pid": pid})


if __name__ == "__main__":
    sys.exit(main())
