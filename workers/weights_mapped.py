"""A second way to put a safetensors data region on a GPU: from the page cache itself.

``workers.weights`` copies the file into a ring of pinned buffers (page cache -> pinned
memory by reader threads, then pinned -> device by DMA): every byte crosses host memory
three times. Here the file is mapped, and each chunk of the mapping is page-locked in
place (``cudaHostRegister`` with ``cudaHostRegisterReadOnly``), so the copy engine reads
the page cache directly: one crossing, no reader threads, at the price of registering
(pinning) the file's pages, which overlaps the copies of the chunks before. The
registrations are undone after the worker is ready (``weights.flush_host_frees``), as
the ring's unpinning is.

Taken on CUDA by default (``GPU_POOL_WEIGHTS_PATH=auto``: for a file up to a quarter of
the available memory, see ``workers.weights_split``) or always (``=mapped``); which path
is faster depends on the host (``scripts/bench_weights_paths.py`` times both). On a CPU
the registration is skipped, so tests cover the chunk logic.
"""

from __future__ import annotations

import mmap
import os
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from workers.load_targets import Targets

PATH_ENV = "GPU_POOL_WEIGHTS_PATH"
PAGE = mmap.PAGESIZE
HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly: the mapping is PROT_READ
MADV_POPULATE_READ = 22  # linux/mman.h; Python's mmap module names it only on 3.13+

# Mappings still registered: (mmap, its tensor view, [(address, bytes)]); undone by
# ``unregister_all`` (weights.flush_host_frees) or at once when frees are not deferred.
_pending: list[tuple[mmap.mmap, torch.Tensor, list[tuple[int, int]]]] = []
_lock = threading.Lock()  # a split load registers from a second thread


class HostRegisterError(RuntimeError):
    """cudaHostRegister refused a range (the caller falls back to the ring)."""


def _cudart() -> Any:
    return torch.cuda.cudart()


def _register(addr: int, size: int) -> None:
    err = _cudart().cudaHostRegister(addr, size, HOST_REGISTER_READ_ONLY)
    if int(getattr(err, "value", err)) != 0:
        raise HostRegisterError(f"cudaHostRegister({size} bytes) failed: error {err}")


def _unregister(regions: list[tuple[int, int]]) -> None:
    if not regions:
        return  # nothing registered (a CPU): no CUDA runtime to ask
    rt = _cudart()
    for addr, _ in regions:
        rt.cudaHostUnregister(addr)


def unregister_all() -> None:
    while _pending:
        with _lock:
            mm, view, regions = _pending.pop()
        _unregister(regions)
        del view
        _close(mm)


def stream_mapped(
    fd: int,
    targets: Targets,
    span: tuple[int, int],
    chunk: int,
    defer: bool,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy the data bytes ``span`` of ``fd`` into ``targets`` chunk by chunk from the
    mapped file, each chunk page-locked just before its copy (the copy of one overlaps
    the registration of the next). Returns once the copies are done. ``defer``: leave
    the registrations for ``unregister_all``."""
    header, device = targets.header, targets.device
    cuda = device.type == "cuda"
    if span[1] <= span[0]:
        return
    a0, b0 = header.data_start + span[0], header.data_start + span[1]
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # a read-only buffer: torch warns, nothing writes it
        warnings.simplefilter("ignore")
        base = torch.frombuffer(mm, dtype=torch.uint8)
    regions: list[tuple[int, int]] = []
    addr = base.data_ptr()
    kept = False
    try:
        if cuda:
            _populate(mm, a0, b0)
        first = targets.first_at(span[0])
        for a, b in _chunks(a0, b0, chunk):
            if cuda:
                # One registration per chunk, page-aligned and disjoint from the others:
                # a copy must lie inside one registered range (the driver looks up one).
                start, end = (a // PAGE) * PAGE, min(size, -(-b // PAGE) * PAGE)
                _register(addr + start, end - start)
                regions.append((addr + start, end - start))
            src = base[a:b]
            try:
                first = targets.copy(src, a - header.data_start, first, cuda)
            except RuntimeError as e:  # the driver refused the copy: the ring instead
                raise HostRegisterError(f"copy from the mapped file failed: {e}") from e
            finally:
                del src
            if progress is not None:
                progress(b - a)
        if cuda:
            torch.cuda.current_stream(device).synchronize()
        if defer and regions:
            with _lock:
                _pending.append((mm, base, regions))
            kept = True
    finally:
        if not kept:
            if cuda:
                torch.cuda.current_stream(device).synchronize()  # no copy reads it now
            _unregister(regions)
            del base
            _close(mm)


def _populate(mm: mmap.mmap, a: int, b: int) -> None:
    """Map the pages of ``[a, b)`` in one call (MADV_POPULATE_READ, Linux 5.14): the
    registrations then find them mapped, which made them about a quarter faster on an
    H200 host (docs/PERFORMANCE.md). Older kernels refuse it; the registration then
    faults the pages in itself."""
    start = (a // PAGE) * PAGE
    try:
        mm.madvise(MADV_POPULATE_READ, start, b - start)
    except (OSError, ValueError):
        pass


def _chunks(begin: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """File ranges ``[a, b)`` covering ``[begin, end)``, about ``chunk`` bytes each, every
    boundary but ``begin`` and ``end`` on a page: their page-rounded registrations are
    disjoint, and each range lies inside its own."""
    out: list[tuple[int, int]] = []
    a = begin
    while a < end:
        b = min(end, ((a + chunk) // PAGE) * PAGE)
        if b <= a:
            b = min(end, (a // PAGE + 1) * PAGE)
        out.append((a, b))
        a = b
    return out


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view still exported (an error unwinding): the GC closes it
        pass
