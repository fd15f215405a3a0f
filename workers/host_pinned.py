"""Page-locked host memory for staged weights, kept out of torch's caching host allocator.

A staged model (``workers.staged``: drain-first, a standby's preload) sits in pinned
host memory until it is on the device; the worker gives that memory back after it is
ready (``weights.flush_host_frees``, on a thread of its own). When it came from torch's
caching host allocator, giving it back meant ``empty_host_cache``: one call that holds
the allocator's lock while it unpins every block, about 0.1 ms per MiB. Meanwhile the
serving thread's first replies wait on the same lock, because a non-blocking
device-to-host copy allocates its pinned destination there: on a lent H200 every client
of a drain-first upgrade went 0.09-0.16 s longer without an answer than the hold itself.

Here the memory is an anonymous mapping (transparent huge pages asked for), page-locked
with ``cudaHostRegister`` in regions of about ``REGISTER_CHUNK``, and unpinned region by
region with ``cudaHostUnregister``: torch's allocator never sees it, and between two
regions any other thread's CUDA call gets its turn. Where registration is refused,
callers fall back to torch's pinned memory.

One copy must not cross from one region into the next: the driver looks up the
registration of the copy's start and refuses a range that runs past its end ("invalid
argument"; seen on a lent H200 when a 64 MiB cut fell inside a tensor). So either the
tensors are laid out around the cuts (``layout``: TorchScript and export modules, whose
``.to(device)`` copies each tensor in one call) or each copy is split at them
(``PinnedArena.pieces``: safetensors, whose tensors sit where the file put them).
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["PinnedArena", "HostRegisterError", "layout", "release", "flush"]

PAGE = mmap.PAGESIZE
REGISTER_CHUNK = 64 << 20  # one unpin at ~0.1 ms per MiB: a few ms in a row at most
REGISTER_DEFAULT = 0x00  # cudaHostRegisterDefault
PAUSE_S = 0.0005  # between two chunks' unpins: another thread's CUDA call gets in


class HostRegisterError(RuntimeError):
    """cudaHostRegister refused a range."""


def _cudart() -> Any:
    return torch.cuda.cudart()


def cuda_register(addr: int, size: int) -> None:
    err = _cudart().cudaHostRegister(addr, size, REGISTER_DEFAULT)
    if int(getattr(err, "value", err)) != 0:
        raise HostRegisterError(f"cudaHostRegister({size} bytes) failed: error {err}")


def cuda_unregister(addr: int) -> None:
    _cudart().cudaHostUnregister(addr)


class PinnedArena:
    """``size`` bytes of page-locked host memory as a uint8 tensor (``tensor``),
    registered as regions that start at 0 and at each offset in ``cuts`` (page-aligned,
    increasing; default: every ``REGISTER_CHUNK``)."""

    def __init__(
        self,
        size: int,
        register: Callable[[int, int], None] = cuda_register,
        unregister: Callable[[int], None] = cuda_unregister,
        cuts: Sequence[int] | None = None,
    ) -> None:
        self.size = size
        self._unregister = unregister
        self._mm: mmap.mmap | None = mmap.mmap(-1, _round_up(max(size, 1), PAGE))
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mm.madvise(mmap.MADV_HUGEPAGE)  # fewer pages for the driver to lock
            except OSError:
                pass
        self.tensor: torch.Tensor = torch.frombuffer(self._mm, dtype=torch.uint8)[:size]
        self.bounds = _bounds(len(self._mm), cuts) if size else []
        self.regions: list[int] = []
        base = self.tensor.data_ptr() if size else 0
        try:
            for lo, hi in self.bounds:
                register(base + lo, hi - lo)
                self.regions.append(base + lo)
        except Exception:
            self.unpin(pause_s=0.0)
            raise

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` split where it crosses from one registered region into the next:
        each piece can be one copy."""
        out = []
        for start, end in self.bounds:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.append((a, b))
        return out or [(lo, hi)]

    @property
    def pinned(self) -> bool:
        return bool(self.regions)

    def unpin(self, pause_s: float = PAUSE_S) -> None:
        """Unpin chunk by chunk, then unmap. The caller makes sure no copy still reads it."""
        while self.regions:
            self._unregister(self.regions.pop(0))
            if self.regions and pause_s:
                time.sleep(pause_s)
        self.tensor = torch.empty(0, dtype=torch.uint8)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view of it still alive somewhere: the GC unmaps it
                pass
            self._mm = None


# Arenas given back while the worker defers host frees (weights.defer_host_frees).
_pending: list[PinnedArena] = []


def release(arena: PinnedArena, deferred: bool) -> None:
    """Unpin ``arena`` now, or (``deferred``) at the next ``flush``."""
    if deferred:
        _pending.append(arena)
    else:
        arena.unpin()


def pending() -> bool:
    return bool(_pending)


def flush() -> bool:
    """Unpin every arena released while deferred; True if there were any."""
    had = bool(_pending)
    while _pending:
        _pending.pop(0).unpin()
    return had


def layout(nbytes: Sequence[int], align: int) -> tuple[list[int], int, list[int]]:
    """Places for items of ``nbytes`` bytes, each ``align``-aligned, such that none
    crosses a region cut: (offsets, total size, cuts for ``PinnedArena``). A new region
    starts, page-aligned, before an item that would run past ``REGISTER_CHUNK`` bytes of
    the current one; an item larger than that gets a region of its own size."""
    places: list[int] = []
    cuts: list[int] = []
    at = start = 0
    for n in nbytes:
        # An empty item (a tensor the caller pins elsewhere) needs no region: a cut for
        # it could fall at the very end, outside the arena.
        if n and at > start and at + n > start + REGISTER_CHUNK:
            start = at = _round_up(at, PAGE)
            cuts.append(start)
        places.append(at)
        at += _round_up(n, align)
    return places, at, cuts


def _bounds(length: int, cuts: Sequence[int] | None) -> list[tuple[int, int]]:
    starts = [0, *(range(REGISTER_CHUNK, length, REGISTER_CHUNK) if cuts is None else cuts)]
    pairs = zip(starts, starts[1:], strict=False)
    if any(c % PAGE or c <= prev or c >= length for prev, c in pairs):
        raise ValueError(f"region cuts must be page-aligned, increasing, inside: {cuts}")
    return list(zip(starts, [*starts[1:], length], strict=True))


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to
