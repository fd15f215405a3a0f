"""Inputs to the GPU through one reused pinned buffer, concatenated in place.

Allocating pinned memory costs milliseconds per call (it registers pages with the
driver), so a buffer per batch shape would be slower than none. One arena per worker
grows to the largest batch seen; each forward carves its inputs out of it with a bump
offset, ``torch.cat`` writes the batch straight into the pinned slice (one host copy,
not two) and the host-to-device copy runs asynchronously on the current stream. The
next forward reuses the arena only after the previous one's outputs were copied back
to the host, which synchronises the stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ALIGN = 256


class Stager:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.arena = torch.empty(0, dtype=torch.uint8)
        self.offset = 0

    def reset(self) -> None:
        """Start a new forward: everything staged before it has reached the device."""
        self.offset = 0

    def stage(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.cat(parts)`` (or the one part) on the device."""
        if self.device.type != "cuda":
            return parts[0] if len(parts) == 1 else torch.cat(list(parts))
        first = parts[0]
        rows = sum(int(p.shape[0]) for p in parts) if first.dim() else 0
        shape = (rows, *first.shape[1:]) if first.dim() else ()
        nbytes = first.element_size() * (rows * math.prod(first.shape[1:]) if first.dim() else 1)
        if nbytes == 0:
            return torch.empty(shape, dtype=first.dtype, device=self.device)
        start = -(-self.offset // ALIGN) * ALIGN
        if start + nbytes > self.arena.numel():
            if self.offset:
                # A forward with several large inputs: don't move data already staged.
                return self._unpinned(parts)
            size = max(nbytes, 2 * self.arena.numel())
            self.arena = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            start = 0
        buf = self.arena[start : start + nbytes].view(first.dtype).view(shape)
        if len(parts) == 1:
            buf.copy_(first)
        else:
            torch.cat(list(parts), out=buf)
        self.offset = start + nbytes
        return buf.to(self.device, non_blocking=True)

    def _unpinned(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        host = parts[0] if len(parts) == 1 else torch.cat(list(parts))
        return host.to(self.device)
