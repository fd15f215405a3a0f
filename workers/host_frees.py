"""When a worker gives its pinned host memory back: after "ready", not before.

Unpinning hundreds of MiB takes long enough to show in a drain-first hold, and freeing
it after the worker said "ready" costs the clients nothing (``workers.serve`` calls
``flush_host_frees`` on a thread of its own). Three kinds are deferred: torch's cached
pinned blocks (the weights ring), the mapped path's registrations
(``workers.weights_mapped``) and the staged models' arenas (``workers.host_pinned``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from workers import host_pinned, weights_mapped

__all__ = [
    "PINNED_ENV",
    "defer_host_frees",
    "flush_host_frees",
    "pinned_arena",
    "release_arena",
]

log = logging.getLogger(__name__)

PINNED_ENV = "GPU_POOL_PINNED"  # "torch": staged weights in torch's pinned memory, as before

# A worker gives pinned memory back after it said "ready", not before (``defer_host_frees``):
# unpinning hundreds of MiB (cudaFreeHost) takes long enough to show in a drain-first
# hold, and freeing it later costs the clients nothing.
_defer = {"on": False, "pending": False}


def defer_host_frees(on: bool = True) -> bool:
    """From now on (``on``), keep freed pinned blocks cached until ``flush_host_frees``;
    returns whether a deferred free is pending."""
    _defer["on"] = on
    return bool(_defer["pending"]) or bool(weights_mapped._pending) or host_pinned.pending()


def flush_host_frees() -> bool:
    """Give back the pinned blocks whose release was deferred; True if there were any."""
    pending = bool(_defer["pending"]) or bool(weights_mapped._pending)
    _defer["pending"] = False
    arenas = host_pinned.flush()
    if pending:
        weights_mapped.unregister_all()
        _free_host_cache()
    return pending or arenas


def release_arena(arena: host_pinned.PinnedArena) -> None:
    """Unpin ``arena`` now, or with the other deferred frees after "ready"."""
    host_pinned.release(arena, deferred=bool(_defer["on"]))


def pinned_arena(size: int, cuts: Sequence[int] | None = None) -> host_pinned.PinnedArena | None:
    """Page-locked memory of our own for ``size`` bytes (``workers.host_pinned``), or
    None where the driver refuses it (the caller takes torch's pinned memory instead);
    ``GPU_POOL_PINNED=torch`` always takes torch's."""
    if os.environ.get(PINNED_ENV, "") == "torch" or size == 0:
        return None
    try:
        return host_pinned.PinnedArena(size, cuts=cuts)
    except (host_pinned.HostRegisterError, OSError, RuntimeError) as e:
        log.info("pinned arena of %d bytes refused (%s): torch's pinned memory instead", size, e)
        return None


def _empty_host_cache() -> None:
    if _defer["on"]:
        _defer["pending"] = True
        return
    _free_host_cache()


def _free_host_cache() -> None:
    """Release torch's cached pinned host blocks (torch >= 2.12; older ones keep them)."""
    empty = getattr(torch.accelerator, "empty_host_cache", None)
    if empty is None:
        empty = getattr(torch._C, "_host_emptyCache", None)  # torch 2.10/2.11 spelling
    if empty is not None:
        empty()
