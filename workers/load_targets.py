"""The device tensors one safetensors load fills, shared by the ways it copies.

A load copies the file's data region chunk by chunk: through the pinned ring
(``workers.weights``), from the page-locked mapping (``workers.weights_mapped``), or both
at once on two halves of the file (``workers.weights_split``). A tensor may span several
chunks and a chunk hold many tensors, so each chunk is copied out piece by piece into the
byte views of the tensors it overlaps. Each tensor is allocated when the first chunk that
reaches it is copied, so that device allocations (a ``cudaMalloc`` each in a fresh
process) overlap the reads instead of stalling them all at the start; two copiers on
different parts of the file may allocate at the same time, hence the lock.
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from workers.safetensors_header import Header, TensorSpec


class Targets:
    """The tensors of ``header`` on ``device``, each with its own storage."""

    def __init__(self, header: Header, device: torch.device) -> None:
        self.header = header
        self.device = device
        self.pieces: list[TensorSpec] = [s for s in header.tensors if s.nbytes]
        self._ends = [p.end for p in self.pieces]
        self._bytes: list[torch.Tensor | None] = [None] * len(self.pieces)
        self._lock = threading.Lock()
        self.out: dict[str, torch.Tensor] = {
            s.name: torch.empty(s.shape, dtype=s.dtype, device=device)
            for s in header.tensors
            if not s.nbytes
        }

    def first_at(self, lo: int) -> int:
        """The index of the first tensor that holds data byte ``lo`` or lies after it."""
        return bisect.bisect_right(self._ends, lo)

    def _target(self, i: int) -> torch.Tensor:
        view = self._bytes[i]
        if view is None:
            with self._lock:
                view = self._bytes[i]
                if view is None:
                    p = self.pieces[i]
                    t = torch.empty(p.shape, dtype=p.dtype, device=self.device)
                    self.out[p.name] = t
                    view = self._bytes[i] = t.reshape(-1).view(torch.uint8)
        return view

    def copy(self, src: torch.Tensor, lo: int, first: int, non_blocking: bool) -> int:
        """Copy the data bytes ``[lo, lo + len(src))``, held in ``src``, into the tensors
        they overlap, starting at tensor ``first``; returns the first one this copy does
        not complete (the ``first`` of the next chunk)."""
        hi = lo + src.numel()
        i = first
        while i < len(self.pieces) and self.pieces[i].begin < hi:
            p = self.pieces[i]
            a, b = max(p.begin, lo), min(p.end, hi)
            if a < b:
                into = self._target(i)[a - p.begin : b - p.begin]
                into.copy_(src[a - lo : b - lo], non_blocking=non_blocking)
            if p.end <= hi:
                first = i + 1
            i += 1
        return first

    def result(self) -> dict[str, torch.Tensor]:
        """Every tensor, in the header's order (those no copy reached allocated now)."""
        for i in range(len(self.pieces)):
            self._target(i)
        return {s.name: self.out[s.name] for s in self.header.tensors}
