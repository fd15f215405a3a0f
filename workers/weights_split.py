"""Both ways of putting a safetensors file on a GPU at once, each on its own part.

The ring (``workers.weights``: reader threads copy the page cache into pinned buffers)
is bounded by the host's memory copy, the mapped path (``workers.weights_mapped``: the
driver page-locks the page cache and the GPU reads it in place) by how fast the driver
pins pages, and on an H200 host each alone fed the bus at about half its speed
(docs/PERFORMANCE.md). They use different resources (many cores copying, one thread in
the driver), so the file is cut in two: the mapped path takes the front share in a
thread of its own while the ring takes the rest, and the copy engine is fed by both.

``GPU_POOL_WEIGHTS_PATH`` chooses: ``auto`` (the default), ``ring``, ``split`` or
``mapped`` (all to the mapped path); ``GPU_POOL_WEIGHTS_SPLIT`` is the split's mapped
share in percent. Which is fastest depends on the host. Measured on four hosts
(docs/PERFORMANCE.md), the mapped path alone fed the bus at 0.59-0.66x where the ring's
reader threads were the bound (0.46-0.55x), and at 0.71-0.78x on the one host where the
ring reached 0.79x; sharing the copy engine in a split only slowed the fast host. So
``auto`` takes the mapped path, whose worst case is the better one, unless the file is
larger than a quarter of the host's available memory: the mapped path keeps the whole
file's page cache page-locked until the worker is ready, the ring only its buffers.
Where the driver refuses to page-lock the file (a file system it cannot pin, an old
driver), the ring reads the part the mapped path did not finish, and the load goes on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from pool.host_files import available_ram
from pool.preload import RAM_SHARE  # auto's bound: the standby preload's, for the same reason
from workers import weights_mapped
from workers.load_targets import Targets

log = logging.getLogger(__name__)

PATH_ENV, SHARE_ENV = weights_mapped.PATH_ENV, "GPU_POOL_WEIGHTS_SPLIT"
# The mapped path's chunk: one registration each. 32 MiB was the fastest of 8, 32 and
# 64 on the H200 host (registration dominates; fewer, larger calls cost less per byte,
# and the last chunk's copy is the tail no registration overlaps).
MAPPED_CHUNK_BYTES = 32 << 20
DEFAULT_SHARE = 0.55
fallbacks = 0  # loads whose mapped part the ring read again (benchmarks report it)

Ring = Callable[[Targets, tuple[int, int], Callable[[int], None] | None], None]


def mapped_share(
    device: torch.device, mapped: bool | None, size: int, available: int | None = None
) -> float:
    """The share of the data region the mapped path takes (0: the ring alone). Only on
    CUDA: elsewhere the ring's synchronous copies are what the tests check. ``size``:
    the file's bytes; ``available``: MemAvailable (None: read it; ``auto`` takes the
    ring where it cannot be read)."""
    if mapped is not None:
        return 1.0 if mapped else 0.0
    if device.type != "cuda":
        return 0.0
    path = os.environ.get(PATH_ENV, "") or "auto"
    if path == "mapped":
        return 1.0
    if path == "auto":
        if available is None:
            available = available_ram()
        return 1.0 if available is not None and size <= available * RAM_SHARE else 0.0
    if path != "split":
        return 0.0  # the ring, asked for by name (or a value we do not know)
    raw = os.environ.get(SHARE_ENV, "")
    return min(100, int(raw)) / 100 if raw.isdigit() else DEFAULT_SHARE


def cut_point(data_start: int, data_size: int, share: float) -> int:
    """The data offset where the ring takes over: ``share`` of the region, rounded down
    so that it falls on a page of the file (the mapped part registers whole pages)."""
    if share >= 1.0:
        return data_size
    page = weights_mapped.PAGE
    file_cut = ((data_start + int(data_size * share)) // page) * page
    return max(0, min(data_size, file_cut - data_start))


def load(
    fd: int,
    targets: Targets,
    share: float,
    ring: Ring,
    defer: bool,
    progress: Callable[[int], None] | None = None,
    mapped_chunk: int = MAPPED_CHUNK_BYTES,
) -> None:
    """Fill ``targets`` from ``fd``: the first ``share`` of the data by the mapped path
    (in a thread when the ring has a part too), the rest by ``ring(targets, span,
    progress)``."""
    header = targets.header
    total = header.data_size
    cut = cut_point(header.data_start, total, share)
    report = _Progress(progress)
    error: weights_mapped.HostRegisterError | None = None
    cuda = targets.device.type == "cuda"

    def front() -> None:
        weights_mapped.stream_mapped(fd, targets, (0, cut), mapped_chunk, defer, report.mapped)

    if cut >= total:
        try:
            front()
        except weights_mapped.HostRegisterError as e:
            error = e
    else:
        stream = torch.cuda.current_stream(targets.device) if cuda else None

        def front_beside() -> None:
            if stream is None:
                front()
                return
            with torch.cuda.stream(stream):  # the caller's stream, as the ring's copies
                front()

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-mapped") as pool:
            done = pool.submit(front_beside)
            try:
                ring(targets, (cut, total), report.ring)
            finally:
                try:
                    done.result()
                except weights_mapped.HostRegisterError as e:
                    error = e
    if error is not None:
        global fallbacks
        fallbacks += 1
        log.warning("the mapped path failed (%s); reading its part through the ring", error)
        ring(targets, (0, cut), report.redo)


class _Progress:
    """One progress callback fed by two threads; bytes the mapped path reported before
    it failed are not counted twice when the ring reads them again."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._mapped = 0  # bytes the mapped path reported
        self._redone = 0

    def _send(self, n: int) -> None:
        if self._progress is not None and n > 0:
            with self._lock:
                self._progress(n)

    def mapped(self, n: int) -> None:
        self._mapped += n
        self._send(n)

    def ring(self, n: int) -> None:
        self._send(n)

    def redo(self, n: int) -> None:
        before = self._redone
        self._redone += n
        self._send(max(0, self._redone - max(before, self._mapped)))
