"""Threads that copy received request bytes into the staging arenas (``workers.staging``).

A GPU worker copies each input from its zeromq frame into pinned memory before the
device reads it (30-70 µs for a 300 KiB image on the hosts we measured). The copies run
beside the serving loop, on:

* ``NativeCopier``: threads in C (``workers/copier.c``, built with the package) that
  never take the GIL, several of them, each large input cut into chunks they share. A
  burst of requests that arrived together is in the arena sooner, so a launch waits
  less for its inputs.
* ``ThreadCopier``: one Python thread calling ``ctypes.memmove`` (which releases the
  GIL). The fallback where the C library was not built; more Python threads made the
  worker slower, each one having to win the GIL back after every copy.

Both take lists of ``(address, buffer)`` and return a ticket with ``is_set`` and
``wait`` (a ``threading.Event`` for the thread copier); the copier keeps the buffers
referenced until their copies are done. A copy that cannot be made (not a buffer) is reported as
``failure``, which ``Stager.settle`` raises where the arena would be read.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
from collections import deque
from queue import SimpleQueue
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
ABI = 1
RING = 8192  # chunks queued at most (128 KiB each: 1 GiB of copies in flight)
MAX_THREADS = 16
THREADS_ENV = "GPU_POOL_COPY_THREADS"


class Ticket(Protocol):
    def is_set(self) -> bool: ...

    def wait(self) -> Any: ...


class Copier(Protocol):
    failure: BaseException | None
    handover: int  # copies a stager collects before it submits them

    def submit(self, items: list[tuple[int, Any]]) -> Ticket: ...

    def close(self) -> None: ...


def copy_threads() -> int:
    """Copy threads for a worker: $GPU_POOL_COPY_THREADS, else 2 where it may use 8 CPUs
    or more, else 1. On an H100 host (16 cores, resnet50 at 7,000 images/s) two threads
    beat four: the launch waited as little, for less CPU (docs/PERFORMANCE.md)."""
    env = os.environ.get(THREADS_ENV, "")
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    return 2 if len(os.sched_getaffinity(0)) >= 8 else 1


def new_copier(threads: int | None = None) -> Copier:
    """The C copier with ``threads`` threads (default ``copy_threads()``), else the
    Python one (logged once: the package was installed without its C parts)."""
    try:
        return NativeCopier(copy_threads() if threads is None else threads)
    except CopierUnavailable as exc:
        global _warned
        if not _warned:
            log.warning("staging copies on one Python thread: %s", exc)
            _warned = True
        return ThreadCopier()


_warned = False


class CopierUnavailable(RuntimeError):
    pass


class ThreadCopier:
    """One Python thread; copies handed over in lists, each with an event set once done."""

    # A queue operation and a wake-up per list: a few requests each, not one.
    handover = 8

    def __init__(self) -> None:
        self.queue: SimpleQueue[tuple[list[tuple[int, Any]], threading.Event] | None]
        self.queue = SimpleQueue()
        self.failure: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="stager-copies", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            items, done = job
            for address, data in items:
                try:
                    source = np.frombuffer(data, dtype=np.uint8)
                    ctypes.memmove(address, source.ctypes.data, source.nbytes)
                except BaseException as exc:  # reported by the stager that waits on it
                    self.failure = exc
            done.set()

    def submit(self, items: list[tuple[int, Any]]) -> threading.Event:
        if self.closed:
            raise RuntimeError("the copier is closed")
        done = threading.Event()
        self.queue.put((items, done))
        return done

    def close(self) -> None:
        """The thread finishes what was queued, then ends."""
        if not self.closed:
            self.closed = True
            self.queue.put(None)


# ------------------------------------------------------------------------------ C
_lib: ctypes.CDLL | None = None
_vp = ctypes.c_void_p
_u64 = ctypes.c_uint64


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    found = sorted(glob.glob(os.path.join(HERE, "_copier*.so")))
    if not found:
        raise CopierUnavailable(
            f"no {HERE}/_copier*.so: install the package with `pip install .` or build it "
            "with `gcc -O2 -shared -fPIC -pthread -o workers/_copier.so workers/copier.c`"
        )
    try:
        lib = ctypes.CDLL(found[0])
    except OSError as exc:
        raise CopierUnavailable(f"{found[0]}: {exc}") from exc
    if not hasattr(lib, "cp_abi") or lib.cp_abi() != ABI:
        raise CopierUnavailable(f"{found[0]} is a stale build: rebuild the package")
    lib.cp_new.restype = _vp
    lib.cp_new.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.cp_submit.restype = _u64
    lib.cp_submit.argtypes = [
        _vp,
        ctypes.POINTER(_vp),
        ctypes.POINTER(_vp),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_int,
    ]
    lib.cp_done.restype = _u64
    lib.cp_done.argtypes = [_vp]
    lib.cp_wait.restype = None
    lib.cp_wait.argtypes = [_vp, _u64]
    lib.cp_free.restype = None
    lib.cp_free.argtypes = [_vp]
    _lib = lib
    return lib


class NativeTicket:
    """Done once the copier's done prefix reaches ``seq``."""

    __slots__ = ("copier", "done", "seq")

    def __init__(self, copier: NativeCopier, seq: int) -> None:
        self.copier = copier
        self.seq = seq
        self.done = False

    def is_set(self) -> bool:
        if not self.done:
            self.done = self.copier.done() >= self.seq
        return self.done

    def wait(self) -> None:
        if not self.done:
            self.copier.wait(self.seq)  # ctypes releases the GIL meanwhile
            self.done = True


class NativeCopier:
    """``threads`` C threads copying from a ring of ``ring`` chunks (``workers/copier.c``)."""

    # A submission costs a few microseconds: each request's copy starts as it arrives.
    handover = 1

    def __init__(self, threads: int, ring: int = RING) -> None:
        self.lib = _load()
        self.handle = self.lib.cp_new(max(1, min(threads, MAX_THREADS)), ring)
        if not self.handle:
            raise CopierUnavailable("could not start the copy threads")
        self.failure: BaseException | None = None
        self.inflight: deque[tuple[int, list[Any]]] = deque()

    def submit(self, items: list[tuple[int, Any]]) -> NativeTicket:
        if not self.handle:
            raise RuntimeError("the copier is closed")
        dst: list[int] = []
        src: list[int] = []
        size: list[int] = []
        keep: list[Any] = []
        for address, data in items:
            try:
                source = np.frombuffer(data, dtype=np.uint8)
            except (TypeError, ValueError) as exc:  # not a buffer: nothing is copied
                self.failure = exc
                continue
            dst.append(address)
            src.append(source.__array_interface__["data"][0])
            size.append(source.nbytes)
            keep.append(source)
        self._release()
        n = len(dst)
        if not n:
            return NativeTicket(self, 0)
        seq = int(
            self.lib.cp_submit(
                self.handle,
                (_vp * n)(*dst),
                (_vp * n)(*src),
                (ctypes.c_size_t * n)(*size),
                n,
            )
        )
        # The sources stay referenced here until copied, whatever becomes of the ticket.
        self.inflight.append((seq, keep))
        return NativeTicket(self, seq)

    def _release(self) -> None:
        inflight = self.inflight
        if inflight:
            done = self.done()
            while inflight and inflight[0][0] <= done:
                inflight.popleft()

    def done(self) -> int:
        return int(self.lib.cp_done(self.handle)) if self.handle else 1 << 63

    def wait(self, seq: int) -> None:
        if self.handle:
            self.lib.cp_wait(self.handle, seq)

    def close(self) -> None:
        """Finish the queued copies and stop the threads."""
        handle, self.handle = self.handle, None
        if handle:
            self.lib.cp_free(handle)
        self.inflight.clear()
