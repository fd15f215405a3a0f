"""ctypes binding for ``router/fastlane.c``: the router's per-request path in C.

The C side never calls into Python and uses no Python headers, so ctypes can call it
with the GIL released. ``Core`` below is one router's C state behind typed methods;
``router.fastlane_abi`` declares the C functions and records, ``router.fastlane_load``
finds, checks and binds the library (both re-exported here).

Build: ``pip install -e .`` compiles it (setup.py); by hand, ``python -m router.genheader
&& gcc -O2 -shared -fPIC -o router/_fastlane.so router/fastlane.c``. Its constants, the
request-info record included, come from ``router.protocol`` through the generated
``router/fastlane_protocol.h``; a library built from other values is refused.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple

import zmq

from router import protocol as p
from router.fastlane_abi import PollItem, ReqInfo
from router.fastlane_load import (
    BUILD_HINT,
    PROTOCOL_DIGEST,
    FastlaneUnavailable,
    available,
    load,
)

__all__ = [
    "BUILD_HINT",
    "PROTOCOL_DIGEST",
    "Core",
    "FastlaneUnavailable",
    "PeerStats",
    "PollItem",
    "ReqInfo",
    "available",
    "check_header",
    "load",
]

_u8p = ctypes.POINTER(ctypes.c_ubyte)
_u64 = ctypes.c_uint64
SWEEP_MAX = 4096  # keys per list per sweep; the rest wait for the next tick


class PeerStats(NamedTuple):
    """The frontend's client connections as the C core sees them (``fl_peer_stats``)."""

    peers: int  # connections with a request or an unread reply
    held: int  # reply bytes libzmq holds for them, unread (payload + 64 bytes a frame)
    most: int  # the most one connection holds
    over: int  # connections past their cap, whose requests are refused
    dropped_unread: int  # requests not answered at all: their connection reads nothing
    dropped_gone: int  # queued requests dropped because their connection left


def check_header(header: bytes) -> tuple[str, int] | None:
    """The C header check alone: (model, timeout_ms or 0) if C would route it, else None."""
    lib = load()
    off, n, timeout = ctypes.c_size_t(), ctypes.c_size_t(), _u64()
    rc = lib.fl_check_header(
        header, len(header), ctypes.byref(off), ctypes.byref(n), ctypes.byref(timeout)
    )
    if rc != 0:
        return None
    return header[off.value : off.value + n.value].decode(), timeout.value


def _as_char_array(items: Sequence[bytes]) -> Any:
    return (ctypes.c_char_p * max(1, len(items)))(*items)


def _as_size_array(items: Sequence[bytes]) -> Any:
    return (ctypes.c_size_t * max(1, len(items)))(*(len(b) for b in items))


class Core:
    """One router's C state: workers, models, requests in flight, punted messages."""

    def __init__(
        self,
        frontend: zmq.Socket[Any],
        backend: zmq.Socket[Any],
        codes: Sequence[str],
        bounds: Sequence[float],
    ) -> None:
        self.lib = lib = load()
        self.frontend = frontend
        self.backend = backend  # kept alive: C holds their raw handles
        handle = lib.fl_new(frontend.underlying, backend.underlying)
        if not handle:
            raise FastlaneUnavailable("fl_new failed")
        self.h = handle
        self.codes = list(codes)
        for code in self.codes:
            raw = code.encode()
            if lib.fl_add_code(handle, raw, len(raw)) < 0:
                raise ValueError(f"too many status codes for fastlane: {code}")
        self.nbounds = len(bounds)
        arr = (ctypes.c_double * max(1, len(bounds)))(*bounds)
        if lib.fl_set_bounds(handle, arr, len(bounds)) != 0:
            raise ValueError("too many histogram bounds for fastlane")
        self._codes_buf = (_u64 * (len(self.codes) + 1))()
        nhist = p.LATENCY_HISTOGRAMS
        self._hist_buf = (_u64 * (nhist * (self.nbounds + 1)))()
        self._sums_buf = (ctypes.c_double * nhist)()
        self._keys = [(_u64 * SWEEP_MAX)() for _ in range(3)]
        self._ptr = _u8p()
        self._info = ReqInfo()
        self._items: Any = None
        self._nitems = 0

    def close(self) -> None:
        if self.h:
            self.lib.fl_free(self.h)
            self.h = None

    # ---------------------------------------------------------------- table edits
    def model_add(self, name: str) -> int:
        raw = name.encode()
        idx = int(self.lib.fl_model_add(self.h, raw, len(raw)))
        if idx < 0:
            raise ValueError(f"fastlane cannot hold model {name!r}")
        return idx

    def model_remove(self, idx: int) -> None:
        self.lib.fl_model_remove(self.h, idx)

    def model_set(
        self, idx: int, open_: bool, retry: bool, timeout_s: float, max_queue: int
    ) -> None:
        self.lib.fl_model_set(self.h, idx, int(open_), int(retry), timeout_s, max_queue)

    def set_reply_limits(self, per_peer: int, total: int, error: bytes) -> None:
        """Reply bytes one client connection may leave unread, and all together (0: no
        bound); ``error`` (``protocol.error_map``) answers a request refused for it."""
        if self.lib.fl_set_reply_limits(self.h, per_peer, total, error, len(error)) != 0:
            raise MemoryError("fastlane: no memory for the error template")

    def model_set_full_error(self, idx: int, error: bytes) -> None:
        """The error map C answers with when model ``idx``'s queue is full."""
        if self.lib.fl_model_set_full_error(self.h, idx, error, len(error)) != 0:
            raise MemoryError("fastlane: no memory for the error template")

    def model_rejections(self, idx: int) -> tuple[int, int, int]:
        """OVERLOADED answers C gave for model ``idx`` since the last call: (queue full,
        given up for another connection's request, connection holding too many replies)."""
        out = (_u64 * 3)()
        self.lib.fl_model_rejections(self.h, idx, out)
        return int(out[0]), int(out[1]), int(out[2])

    def peer_stats(self) -> PeerStats:
        """Forget client connections that hold nothing; describe the rest."""
        out = (ctypes.c_int64 * 6)()
        self.lib.fl_peer_stats(self.h, out)
        return PeerStats(*(int(v) for v in out))

    def peer_closed(self, fd: int) -> None:
        """The frontend closed connection ``fd``: drop what its clients still have queued."""
        self.lib.fl_peer_closed(self.h, fd)

    def trim(self) -> bool:
        """Return the allocator's free pages to the kernel (``malloc_trim``)."""
        return bool(self.lib.fl_trim())

    def kick(self, idx: int) -> None:
        """Send what a model's queue holds to workers with credit."""
        self.lib.fl_kick(self.h, idx)

    def queued(self, idx: int) -> int:
        return int(self.lib.fl_queued(self.h, idx))

    def queue_take(self, idx: int) -> list[int]:
        """Empty a model's queue; the keys of what it held (still to answer and forget)."""
        n = self.queued(idx)
        buf = (_u64 * max(1, n))()
        return list(buf[: int(self.lib.fl_queue_take(self.h, idx, buf, n))])

    def model_set_active(self, idx: int, workers: Sequence[int]) -> None:
        arr = (ctypes.c_int * max(1, len(workers)))(*workers)
        if self.lib.fl_model_set_active(self.h, idx, arr, len(workers)) != 0:
            raise MemoryError("fastlane: no memory for the active worker list")

    def worker_add(self, wid: bytes, model: int, credit: int, version: str) -> int:
        raw = version.encode()
        idx = int(self.lib.fl_worker_add(self.h, wid, len(wid), model, credit, raw, len(raw)))
        if idx < 0:
            raise ValueError(f"fastlane cannot hold worker {wid!r}")
        return idx

    def worker_remove(self, idx: int) -> None:
        self.lib.fl_worker_remove(self.h, idx)

    def lane_listen(self, fd: int) -> None:
        """Hand over a listening, non-blocking SOCK_SEQPACKET socket (C closes it)."""
        self.lib.fl_lane_listen(self.h, fd)

    def worker_has_lane(self, idx: int) -> bool:
        return bool(self.lib.fl_worker_lane(self.h, idx))

    def lane_counts(self) -> tuple[int, int]:
        """Datagrams sent down lanes, and received from them, since the start."""
        return int(self.lib.fl_lane_sent(self.h)), int(self.lib.fl_lane_received(self.h))

    def worker_load(self, idx: int) -> int:
        return int(self.lib.fl_worker_load(self.h, idx))

    def worker_served(self, idx: int) -> int:
        return int(self.lib.fl_worker_served(self.h, idx))

    def worker_stats(self, idx: int) -> tuple[int, list[int], list[list[int]], list[float]]:
        """(requests, counts per code (+1 unknown), histograms, sums) since the last call:
        one histogram and one sum of seconds per ``LATENCY_HISTOGRAMS`` (queue, in-worker
        wait, compute, total); wait and compute count only replies the worker timed."""
        n = int(
            self.lib.fl_worker_stats(self.h, idx, self._codes_buf, self._hist_buf, self._sums_buf)
        )
        if not n:
            return 0, [], [], []
        width = self.nbounds + 1
        hist = list(self._hist_buf)
        return (
            n,
            list(self._codes_buf),
            [hist[i * width : (i + 1) * width] for i in range(p.LATENCY_HISTOGRAMS)],
            list(self._sums_buf),
        )

    # ------------------------------------------------------------------ the loop
    def set_extra(self, items: Sequence[tuple[Any, int]]) -> None:
        """Sockets (pyzmq) or file descriptors the loop should also wake up for."""
        arr = (PollItem * max(1, len(items)))()
        for i, (obj, fd) in enumerate(items):
            arr[i].socket = obj.underlying if obj is not None else None
            arr[i].fd = fd
            arr[i].events = int(zmq.POLLIN)
        self._items = arr
        self._nitems = len(items)

    def run(self, timeout_ms: int, spin_us: int) -> int:
        return int(self.lib.fl_run(self.h, self._items, self._nitems, timeout_ms, spin_us))

    def extra_ready(self, i: int) -> bool:
        return bool(self._items[i].revents)

    def punts(self) -> list[tuple[int, int, list[bytes]]]:
        """Take the punted messages: (kind, worker index, frames)."""
        lib, h, ptr = self.lib, self.h, self._ptr
        out = []
        for i in range(lib.fl_punt_count(h)):
            frames = []
            for j in range(lib.fl_punt_nframes(h, i)):
                n = lib.fl_punt_frame(h, i, j, ctypes.byref(ptr))
                frames.append(ctypes.string_at(ptr, n) if n else b"")
            out.append((lib.fl_punt_kind(h, i), lib.fl_punt_worker(h, i), frames))
        lib.fl_punt_clear(h)
        return out

    # -------------------------------------------------------- Python's requests
    def enqueue(
        self,
        model: int,
        envelope: Sequence[bytes],
        body: Sequence[bytes],
        arrived: float,
        deadline: float,
        attempts: int = 0,
        front: bool = False,
    ) -> int:
        """Queue a request Python held (frames copied); ``kick`` sends it. Returns its key."""
        key = int(
            self.lib.fl_enqueue(
                self.h,
                model,
                _as_char_array(envelope),
                _as_size_array(envelope),
                len(envelope),
                _as_char_array(body),
                _as_size_array(body),
                len(body),
                arrived,
                deadline,
                attempts,
                int(front),
            )
        )
        if key < 0:
            raise MemoryError("fastlane: no memory to queue a request")
        return key

    def info(self, key: int) -> ReqInfo | None:
        info = ReqInfo()
        return info if self.lib.fl_info(self.h, key, ctypes.byref(info)) == 0 else None

    def fail(self, keys: Sequence[int], error: bytes, *, forget: bool) -> Sequence[ReqInfo]:
        """Answer every request in ``keys`` with one error, in one call: C composes each
        reply from ``error`` (the packed ``{"code", "message"}`` map; see
        ``protocol.error_map``) and what it keeps of the request (model, its worker's
        version, the client's id). ``forget``: release them too; otherwise they stay in
        flight, marked answered. One record per key: what it was, and ``delivered``."""
        n = len(keys)
        infos = (ReqInfo * max(1, n))()
        if n:
            arr = (_u64 * n)(*keys)
            self.lib.fl_fail(self.h, arr, n, error, len(error), int(forget), infos)
        return infos[:n]

    def forget(self, key: int) -> None:
        self.lib.fl_forget(self.h, key)

    def worker_drop(self, worker: int) -> list[int]:
        """A worker leaves: retryable requests go back to the front of the queue; returns
        the keys of the others (still to answer and forget)."""
        n = self.worker_load(worker)
        buf = (_u64 * max(1, n))()
        return list(buf[: int(self.lib.fl_worker_drop(self.h, worker, buf, n))])

    def sweep(self, now: float, grace: float) -> tuple[list[int], list[int], list[int]]:
        """Requests past their deadline: (unanswered and never sent to a worker,
        unanswered and held by a worker, answered but their worker silent past grace)."""
        queued, held, overdue = self._keys
        nqueued, nheld = ctypes.c_int(), ctypes.c_int()
        nover = int(
            self.lib.fl_sweep(
                self.h,
                now,
                grace,
                queued,
                ctypes.byref(nqueued),
                held,
                ctypes.byref(nheld),
                overdue,
                SWEEP_MAX,
            )
        )
        return list(queued[: nqueued.value]), list(held[: nheld.value]), list(overdue[:nover])

    def live(self) -> int:
        return int(self.lib.fl_live(self.h))

    def dropped_replies(self) -> int:
        return int(self.lib.fl_dropped_replies(self.h))
