"""Read a ``.safetensors`` file onto a device: the fast CUDA path.

``load_file`` checks the header first (``workers.safetensors_header``: a bad file fails
with one clear ``SafetensorsError`` and never half-loads), then copies the data region to
the device: on CUDA by default from the page-locked page cache itself
(``workers.weights_mapped``; ``workers.weights_split`` says when), else through a small
ring of pinned host buffers: several threads ``preadv`` chunks of the file (page cache
-> pinned memory, GIL released) while the CUDA copy engine moves finished chunks to the
device. ``safetensors.torch.load_file(device="cuda")``
instead copies each tensor from pageable memory (the mapped file), which the driver
stages through pinned buffers of its own, synchronously, with one thread reading.
``stage_file`` reads the data region into host memory ahead of the device being free
(drain-first). No pickle anywhere: the header is JSON and the data raw bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from workers import host_pinned, weights_split
from workers.host_frees import (  # noqa: F401  re-exported: callers use weights.*
    PINNED_ENV,
    _defer,
    _empty_host_cache,
    _free_host_cache,
    defer_host_frees,
    flush_host_frees,
    pinned_arena,
    release_arena,
)
from workers.load_targets import Targets
from workers.page_cache import read_through, resident  # noqa: F401  re-exported
from workers.safetensors_header import (  # noqa: F401  re-exported: callers use weights.*
    DTYPES,
    MAX_HEADER_BYTES,
    Header,
    SafetensorsError,
    TensorSpec,
    _open,
    _read_header,
    parse_header,
    read_header,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHUNK_BYTES",
    "DTYPES",
    "MAX_HEADER_BYTES",
    "READ_THREADS",
    "RING_SLOTS",
    "Header",
    "SafetensorsError",
    "TensorSpec",
    "StagedWeights",
    "defer_host_frees",
    "flush_host_frees",
    "load_file",
    "parse_header",
    "read_header",
    "release_ring",
    "reserve_ring",
    "stage_file",
]

# The ring of pinned buffers is RING_SLOTS x CHUNK_BYTES = 48 MiB. Pinning
# (cudaHostAlloc) is paid on every load and costs far more per byte than a copy, so the
# ring stays small; 8 MiB per chunk still keeps the per-chunk cost (a thread hand-off, a
# copy launch, an event: tens of us) a few percent of the millisecond or so that one
# thread takes to read a chunk. scripts/bench_weights_paths.py times other choices.
CHUNK_BYTES = 8 << 20
# Both can be set for a host (scripts/bench_weights_paths.py finds the best pair there):
THREADS_ENV, CHUNK_ENV = "GPU_POOL_WEIGHTS_THREADS", "GPU_POOL_WEIGHTS_CHUNK_MB"


def _env_int(name: str, lo: int, hi: int) -> int | None:
    raw = os.environ.get(name, "")
    return min(hi, max(lo, int(raw))) if raw.isdigit() else None


CHUNK_BYTES = (_env_int(CHUNK_ENV, 1, 256) or CHUNK_BYTES >> 20) << 20
# One thread copies page cache -> user memory at a few GB/s (one core's memcpy); the
# host-to-device copy runs at ~50 GB/s on an H200, so four threads (15 GB/s measured)
# left the bus two thirds idle. Up to eight, half the cores, so that a busy host keeps
# some (a pool may start a worker per GPU at once).
READ_THREADS = _env_int(THREADS_ENV, 1, 64) or max(4, min(8, (os.cpu_count() or 4) // 2))
# Two slots beyond the readers: one being copied to the device while every reader fills
# another, and one to spare so a reader never waits on a copy that has just been issued.
RING_SLOTS = READ_THREADS + 2
def load_file(
    path: str,
    device: torch.device | str,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    threads: int = READ_THREADS,
    ring_slots: int = RING_SLOTS,
    progress: Callable[[int], None] | None = None,
    mapped: bool | None = None,
    share: float | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` on ``device``, bit-identical to
    ``safetensors.torch.load_file``; each tensor has its own contiguous storage.

    On CUDA the data is streamed through ``ring_slots`` pinned buffers of ``chunk_bytes``
    filled by ``threads`` readers; or a front share of it is copied from the mapped,
    page-locked file (``workers.weights_mapped``) beside the ring
    (``workers.weights_split``; the ring takes over where the driver refuses to pin).
    ``share`` is the mapped path's part, 0 to 1 (None: from ``GPU_POOL_WEIGHTS_PATH``
    and ``GPU_POOL_WEIGHTS_SPLIT``); ``mapped`` True is all of it, False none.

    On any other device the same chunking and threading run with plain host buffers
    and synchronous copies (slower than safetensors' mmap: it is there so that CPU tests
    cover the chunk logic; the model loader keeps using safetensors for the CPU).
    ``progress`` is called with each chunk's byte count once the chunk has been copied
    out (from two threads in a split load, never at once).
    """
    if chunk_bytes < 1 or threads < 1 or ring_slots < 1:
        raise ValueError("chunk_bytes, threads and ring_slots must be at least 1")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fd = _open(path)
    try:
        header = _read_header(fd)
        if share is None:
            share = weights_split.mapped_share(device, mapped, os.fstat(fd).st_size)
        if share <= 0:
            return _stream(fd, header, device, chunk_bytes, threads, ring_slots, progress)
        targets = Targets(header, device)

        def ring(t: Targets, span: tuple[int, int], report: Callable[[int], None] | None) -> None:
            stream_span(fd, t, span, chunk_bytes, threads, ring_slots, report)

        # On a CPU (the tests) the mapped path takes the ring's chunks, so that small ones
        # cut tensors everywhere; on CUDA its registrations have their own size.
        mapped_chunk = chunk_bytes if device.type != "cuda" else weights_split.MAPPED_CHUNK_BYTES
        weights_split.load(fd, targets, share, ring, bool(_defer["on"]), progress, mapped_chunk)
        return targets.result()
    finally:
        os.close(fd)


# A ring pinned ahead of time by a standby (workers.standby): the load that takes it
# pays no cudaHostAlloc. One load only; the ring is freed with it.
_reserved: list[torch.Tensor] = []


def reserve_ring(chunk_bytes: int = CHUNK_BYTES, slots: int = RING_SLOTS) -> None:
    """Pin the ring of the next CUDA ``load_file`` now (needs CUDA initialised)."""
    _reserved[:] = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)]
    _reserved.extend(
        torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots - 1)
    )


def release_ring() -> None:
    """Unpin a reserved ring no load took (a standby that became a TorchScript worker)."""
    if _reserved:
        _reserved.clear()
        _empty_host_cache()


@dataclass
class StagedWeights:
    """A file's data region in host memory (pinned when a GPU is there), read ahead of
    the device being free; ``to_device`` is then one copy at bus speed per tensor."""

    header: Header
    data: torch.Tensor  # uint8, data_size bytes
    arena: host_pinned.PinnedArena | None = None  # where ``data`` lives when pinned by us

    def to_device(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        device = torch.device(device)
        cuda = device.type == "cuda"
        out: dict[str, torch.Tensor] = {}
        for s in self.header.tensors:
            t = torch.empty(s.shape, dtype=s.dtype, device=device)
            if s.nbytes:
                dst = t.reshape(-1).view(torch.uint8)
                # Our arena's registered regions: no one copy may cross from one to the next.
                pieces = self.arena.pieces(s.begin, s.end) if self.arena else [(s.begin, s.end)]
                for lo, hi in pieces:
                    dst[lo - s.begin : hi - s.begin].copy_(self.data[lo:hi], non_blocking=cuda)
            out[s.name] = t
        if cuda:
            torch.cuda.current_stream(device).synchronize()
        return out

    def release(self) -> None:
        """Give the host buffer back (pinned memory is locked RAM). The copies of
        ``to_device`` have finished: it synchronises."""
        arena, self.arena = self.arena, None
        pinned = arena is None and self.data.is_pinned()
        self.data = torch.empty(0, dtype=torch.uint8)
        if arena is not None:
            release_arena(arena)
        elif pinned:
            _empty_host_cache()


def stage_file(
    path: str,
    *,
    pin: bool,
    threads: int = READ_THREADS,
    progress: Callable[[int], None] | None = None,
) -> StagedWeights:
    """Read the checked data region of ``path`` into one host buffer, ``threads`` readers
    at a time (``pin``: page-locked, needs CUDA initialised). ``progress`` is called on
    this thread with each chunk's size, in file order, as the chunks complete."""
    fd = _open(path)
    try:
        header = _read_header(fd)
        arena = pinned_arena(header.data_size) if pin else None
        data = arena.tensor if arena is not None else torch.empty(
            header.data_size, dtype=torch.uint8, pin_memory=pin
        )
        try:
            _read_staged(fd, header, data, threads, progress)
        except BaseException:
            if arena is not None:
                del data
                arena.unpin(pause_s=0.0)  # locked RAM: not left to the garbage collector
            raise
        return StagedWeights(header, data, arena)
    finally:
        os.close(fd)


def _read_staged(
    fd: int,
    header: Header,
    data: torch.Tensor,
    threads: int,
    progress: Callable[[int], None] | None,
) -> None:
    view = data.numpy().data if header.data_size else memoryview(b"")
    step = CHUNK_BYTES
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stage") as pool:
        futures = [
            pool.submit(_read_into, fd, view[lo : lo + step], header.data_start + lo, None)
            for lo in range(0, header.data_size, step)
        ]
        for i, f in enumerate(futures):
            f.result()
            if progress is not None:
                progress(min(step, header.data_size - i * step))


def _stream(
    fd: int,
    header: Header,
    device: torch.device,
    chunk_bytes: int,
    threads: int,
    slots: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Copy the data region of ``fd`` into new tensors on ``device`` through the ring."""
    targets = Targets(header, device)
    stream_span(fd, targets, (0, header.data_size), chunk_bytes, threads, slots, progress)
    return targets.result()


def stream_span(
    fd: int,
    targets: Targets,
    span: tuple[int, int],
    chunk_bytes: int,
    threads: int,
    slots: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy the data bytes ``span`` of ``fd`` into ``targets``, chunk by chunk: chunk
    ``k`` is the bytes ``[begin + k * chunk, begin + (k + 1) * chunk)``, read into ring
    slot ``k % slots``, then copied out (``Targets.copy``). Returns once the copies are
    done."""
    header, device = targets.header, targets.device
    cuda = device.type == "cuda"
    begin, end = span
    total = end - begin
    if total <= 0:
        return
    chunk = min(chunk_bytes, total)
    n_chunks = -(-total // chunk)
    slots = min(slots, n_chunks)
    # Destinations and copies both on the current stream: the caching allocator's stream
    # order then holds as is, with no wait_stream/record_stream.
    stream = torch.cuda.current_stream(device) if cuda else None
    ring: list[torch.Tensor] = []
    views: list[memoryview] = []
    # After the copies out of a slot, an event: its next read waits for it, so a pinned
    # buffer is refilled only once the device has taken its bytes.
    copied: list[torch.cuda.Event | None] = [None] * slots
    reads: dict[int, Future[None]] = {}
    # Pinned ahead by a standby: used when its buffers are as large as a chunk.
    reserved = [b for b in _reserved if cuda and b.numel() >= chunk]
    _reserved.clear()
    pool = ThreadPoolExecutor(max_workers=min(threads, slots), thread_name_prefix="weights")

    def start_read(k: int) -> None:
        s = k % slots
        if s == len(ring):
            # The ring grows as the first reads start, so pinning a slot overlaps the
            # reads into the slots before it; a standby pinned it ahead of time.
            spare = reserved.pop() if reserved else None
            buf = (
                spare[:chunk]
                if spare is not None
                else torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda)
            )
            ring.append(buf)
            views.append(buf.numpy().data)
        lo = begin + k * chunk
        view = views[s][: min(chunk, end - lo)]
        reads[k] = pool.submit(_read_into, fd, view, header.data_start + lo, copied[s])

    try:
        for k in range(slots):
            start_read(k)
        first = targets.first_at(begin)  # tensors before this one are complete
        for k in range(n_chunks):
            lo = begin + k * chunk
            reads.pop(k).result()
            src = ring[k % slots][: min(chunk, end - lo)]
            first = targets.copy(src, lo, first, cuda)
            if progress is not None:
                progress(src.numel())
            del src  # only the ring may hold a pinned buffer, so that it is freed below
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                copied[k % slots] = event
            if k + slots < n_chunks:
                start_read(k + slots)
    finally:
        # Also on error: readers blocked on an event return, no copy still reads a
        # pinned buffer when it is freed, and no thread outlives the file descriptor.
        try:
            if stream is not None:
                stream.synchronize()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            views.clear()
            ring.clear()
            reserved.clear()
            if cuda:
                # Freed pinned blocks stay cached (and locked in RAM) in torch's host
                # allocator; a worker loads once, so give them back to the system.
                _empty_host_cache()


def _read_into(fd: int, view: memoryview, offset: int, after: torch.cuda.Event | None) -> None:
    if after is not None:
        after.synchronize()  # the slot's previous chunk has reached the device
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsError(
                f"file ended at byte {offset + done}, inside the tensor data "
                "(it was truncated while being read)"
            )
        done += n
