"""Inputs to the GPU through a reused (pinned) host arena, concatenated in place.

Allocating pinned memory costs milliseconds per call (it registers pages with the
driver), and a fresh pageable buffer per batch costs a page fault per 4 KiB on first
touch; so each stager owns one arena, carved with a bump offset and grown (between
batches) to the largest batch seen. The worker keeps one stager per gather and takes
turns with them (``workers.serve``): a stager is reset only once the batch that read
it has completed, since the host-to-device copy reads the arena asynchronously.

Two ways in:

* ``put`` copies one request's input bytes into the arena as soon as the request
  arrives (the GPU path: the copy overlaps the running forward, the received frame can
  be freed, and no torch op runs per request). With a copier (``workers.copier``) the
  memcpy runs on its threads and ``settle`` waits for it; without, it is a plain copy
  into a memoryview.
  Consecutive puts of the same layout (dtype and shape after the first dimension) lie
  back to back, so a batch of them already is one contiguous block.
* ``batch`` gives the batch of one input on the device: the block ``put`` built (no host
  copy), or the parts concatenated into the arena; on a CUDA stager it then starts the
  asynchronous host-to-device copy. ``host_batch`` stops before that copy, and
  ``to_device`` makes it on a given stream into a device mirror of the arena.

An input is "staged" as an ``int`` (its byte offset in the arena) or, when it did not
fit or is not in the arena at all, as a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch

from workers.copier import Copier, Ticket

ALIGN = 256
MIN_ARENA = 1 << 16

Staged = int | torch.Tensor


class TensorSpec(NamedTuple):
    """One input as its request header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class Stager:
    def __init__(
        self, device: torch.device, *, pinned: bool | None = None, copier: Copier | None = None
    ) -> None:
        self.device = device
        self.pinned = device.type == "cuda" if pinned is None else pinned
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.mem = memoryview(b"")  # the arena's bytes, for copies without torch ops
        self.offset = 0
        self.high = 0  # end of what this batch placed in the arena
        self.missed = 0  # bytes that did not fit: the arena grows by them on reset
        self.last: Hashable = None  # the layout of the previous put
        self.mirror: torch.Tensor | None = None  # the arena's bytes on the device
        # Copies by ``copier`` (when given): not yet handed over, and handed over.
        self.copier = copier
        self.pending: list[tuple[int, Any]] = []
        self.handed: list[Ticket] = []

    def reset(self) -> None:
        """Start a new batch: every forward that read this arena has completed."""
        self.settle()
        if self.missed:
            need = self.high + self.missed
            self._grow(max(need + need // 4, self.arena.numel()))
        self.offset = 0
        self.high = 0
        self.missed = 0
        self.last = None

    def reserve(self, nbytes: int) -> None:
        """Grow the idle arena to at least ``nbytes`` now rather than mid-batch."""
        if nbytes > self.arena.numel() and not self.offset:
            self._grow(nbytes)

    def _grow(self, nbytes: int) -> None:
        size = max(nbytes, MIN_ARENA)
        self.arena = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        self.mem = self.arena.numpy().data.cast("B")

    def to_device(self, block: torch.Tensor, stream: Any) -> torch.Tensor | None:
        """``block`` (a slice of the arena) copied to the same offsets of a device mirror
        of the arena, asynchronously on ``stream``, so that the copy overlaps the batch
        running on the compute stream; None for a block outside the arena. The mirror,
        like the arena, is rewritten only after the batch that read it has completed."""
        if self.device.type != "cuda" or not self.owns(block):
            return None
        if self.mirror is None or self.mirror.numel() < self.arena.numel():
            self.mirror = torch.empty(self.arena.numel(), dtype=torch.uint8, device=self.device)
        start = block.data_ptr() - self.arena.data_ptr()
        end = start + block.numel() * block.element_size()
        with torch.cuda.stream(stream):
            self.mirror[start:end].copy_(self.arena[start:end], non_blocking=True)
        return self.mirror[start:end].view(block.dtype).view(block.shape)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lives in the arena (so it must not outlive the next reset)."""
        return t.untyped_storage().data_ptr() == self.arena.untyped_storage().data_ptr()

    def _place(self, nbytes: int, packed: bool) -> int | None:
        """Byte offset of ``nbytes`` more arena (aligned unless ``packed``), or None when
        the arena is full (it grows on the next reset)."""
        start = self.offset if packed else -(-self.offset // ALIGN) * ALIGN
        end = start + nbytes
        if end > len(self.mem):
            self.missed += nbytes + ALIGN
            return None
        self.offset = self.high = end
        return start

    # ------------------------------------------------------------------ on arrival
    def put(self, data: Any, spec: TensorSpec, layout: Hashable) -> Staged:
        """Copy one input's bytes (a buffer of exactly ``spec.nbytes``) into the arena;
        ``layout`` (not None) equal to the previous put's packs it right behind that one."""
        nbytes = spec.nbytes
        if nbytes == 0:
            self.last = None
            return torch.empty(spec.shape, dtype=spec.dtype)
        start = self._place(nbytes, layout is not None and layout == self.last)
        if start is None:
            # Full: this input gets pinned memory of its own (torch caches freed pinned
            # blocks), and from the next batch on the arena is large enough.
            self.last = None
            own = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            own.numpy().data.cast("B")[:] = data
            return own.view(spec.dtype).view(spec.shape)
        if self.copier is None:
            self.mem[start : start + nbytes] = data
        else:
            self.pending.append((self.arena.data_ptr() + start, data))  # data: kept alive
            if len(self.pending) >= self.copier.handover:
                self.flush()
        self.last = layout
        return start

    def flush(self) -> None:
        """Hand the copies collected so far to the copier (``workers.copier``)."""
        if self.pending and self.copier is not None:
            self.handed.append(self.copier.submit(self.pending))
            self.pending = []

    def settle(self) -> None:
        """Wait until every byte ``put`` has reached the arena (before reading it)."""
        self.flush()
        for done in self.handed:
            done.wait()
        self.handed.clear()
        if self.copier is not None and self.copier.failure is not None:
            raise RuntimeError(f"staging copy failed: {self.copier.failure}")

    def tensor(self, staged: Staged, spec: TensorSpec) -> torch.Tensor:
        """A staged input as a host tensor."""
        if isinstance(staged, torch.Tensor):
            return staged
        return self.arena[staged : staged + spec.nbytes].view(spec.dtype).view(spec.shape)

    # ------------------------------------------------------------------ at launch
    def batch(self, parts: Sequence[Staged], specs: Sequence[TensorSpec]) -> torch.Tensor:
        """The concatenation of ``parts`` along dim 0 (or the one part) on the device."""
        block = self.host_batch(parts, specs)
        if self.device.type == "cuda":
            # From pinned memory the copy is asynchronous; from pageable memory (a batch
            # that found no room in the arena) it is synchronous, which is still correct.
            return block.to(self.device, non_blocking=block.is_pinned())
        return block

    def host_batch(self, parts: Sequence[Staged], specs: Sequence[TensorSpec]) -> torch.Tensor:
        """The concatenation of ``parts`` along dim 0 in host memory: the arena block
        ``put`` built, or the parts copied together (pinned, on a CUDA stager)."""
        block = self._block(parts, specs)
        if block is not None:
            return block
        tensors = [self.tensor(s, spec) for s, spec in zip(parts, specs, strict=True)]
        cuda = self.device.type == "cuda"
        if len(tensors) == 1 and not (cuda and self.pinned and not tensors[0].is_pinned()):
            return tensors[0]  # nothing to concatenate (or to pin first)
        return self._concat(tensors)

    def _block(self, parts: Sequence[Staged], specs: Sequence[TensorSpec]) -> torch.Tensor | None:
        """The arena block ``parts`` form, when they lie back to back in it."""
        start = parts[0]
        if not isinstance(start, int):
            return None
        first = specs[0]
        if len(parts) == 1:
            return self.tensor(start, first)
        end = start
        rows = 0
        tail = first.shape[1:]
        for staged, spec in zip(parts, specs, strict=True):
            if not isinstance(staged, int) or staged != end or spec.dtype != first.dtype:
                return None
            if spec.shape[1:] != tail:
                return None
            end += spec.nbytes
            rows += spec.shape[0]
        return self.arena[start:end].view(first.dtype).view((rows, *tail))

    def _concat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        first = parts[0]
        rows = sum(int(p.shape[0]) for p in parts) if first.dim() else 0
        shape = (rows, *first.shape[1:]) if first.dim() else ()
        nbytes = first.element_size() * (rows * math.prod(first.shape[1:]) if first.dim() else 1)
        if nbytes == 0:
            return torch.empty(shape, dtype=first.dtype)
        start = self._place(nbytes, False)
        if start is None:
            # Staged inputs took the arena; it is larger from the next batch on.
            return torch.cat(list(parts)) if len(parts) > 1 else first
        self.last = None
        buf = self.arena[start : start + nbytes].view(first.dtype).view(shape)
        if len(parts) == 1:
            buf.copy_(first)
        else:
            torch.cat(list(parts), out=buf)
        return buf
