"""Dynamic batching inside the worker: group compatible requests into one forward.

Requests are compatible when every positional input has the same dtype and the same
shape after the first (batch) dimension. A batch is their inputs concatenated along dim
0; each output is split back by the requests' first-dim sizes. This assumes the model
treats rows independently (true of inference-mode models without cross-row ops); an
output whose first dim is not the batch total shows it does not, and the requests are
then run one by one. A model that must never be batched sets ``max_batch = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from workers.loader import LoadedModel

__all__ = [
    "BatchKey",
    "GroupResult",
    "batch_key",
    "forward_group",
    "plan_batches",
    "run_batch",
]

BatchKey = tuple[tuple[torch.dtype, tuple[int, ...]], ...]


def batch_key(inputs: Sequence[torch.Tensor]) -> BatchKey | None:
    """``(dtype, shape[1:])`` per input; None when the request cannot be batched: no
    inputs, a 0-d input (no batch dimension), or inputs whose first dims differ (the
    rows of the outputs could not be attributed to a request)."""
    if not inputs or any(t.dim() == 0 for t in inputs):
        return None
    if any(t.shape[0] != inputs[0].shape[0] for t in inputs):
        return None
    return tuple((t.dtype, tuple(t.shape[1:])) for t in inputs)


def plan_batches(
    keys: Sequence[Hashable | None], sizes: Sequence[int], max_batch: int
) -> list[list[int]]:
    """Group request indices into batches.

    Requests with equal non-None keys share a batch, in arrival order, while the batch's
    total first-dim size stays within ``max_batch``; a full batch is closed and the next
    one opened. A request larger than ``max_batch`` on its own, or with a None key, runs
    alone. ``max_batch < 1`` is treated as 1 (no batching). Batches are returned in the
    order of their first request, so an early request is never run after a later one's
    batch.
    """
    if len(keys) != len(sizes):
        raise ValueError(f"{len(keys)} keys but {len(sizes)} sizes")
    limit = max(1, max_batch)
    batches: list[list[int]] = []
    open_batch: dict[Hashable, tuple[list[int], int]] = {}  # key -> (indices, rows)
    for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
        if key is None or size > limit:
            batches.append([i])
            continue
        current = open_batch.get(key)
        if current is not None and current[1] + size <= limit:
            current[0].append(i)
            open_batch[key] = (current[0], current[1] + size)
            continue
        fresh = [i]
        batches.append(fresh)
        open_batch[key] = (fresh, size)
    return batches


class GroupResult:
    """What one forward group produced: the whole batch's outputs (``outputs``, cut back
    into requests by ``sizes`` rows each), or one result per request (``alone``) when the
    requests ran one by one."""

    __slots__ = ("alone", "outputs", "sizes")

    def __init__(
        self,
        sizes: list[int],
        outputs: list[torch.Tensor] | None,
        alone: list[list[torch.Tensor] | BaseException] | None = None,
    ) -> None:
        self.sizes = sizes
        self.outputs = outputs
        self.alone = alone

    def split(self) -> list[list[torch.Tensor] | BaseException]:
        """One entry per request: its outputs, or the exception its forward raised."""
        if self.alone is not None:
            return self.alone
        assert self.outputs is not None
        pieces = [torch.split(o, self.sizes) for o in self.outputs]
        return [[p[j] for p in pieces] for j in range(len(self.sizes))]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def forward_group(
    model: LoadedModel,
    sizes: Sequence[int],
    keys: Sequence[Hashable | None],
    stacked: Callable[[], list[torch.Tensor]],
    alone: Callable[[int], list[torch.Tensor]],
    fetch: Callable[[torch.Tensor], torch.Tensor] = _same,
) -> GroupResult:
    """Run a group of requests as one forward when possible.

    The requests are described by their first-dim ``sizes`` and batch ``keys``;
    ``stacked()`` builds the batch's inputs (their concatenation, on the model's device)
    and ``alone(j)`` request ``j``'s own inputs, so the caller decides where the bytes
    come from (the worker: its staging arena) and nothing is built that is not needed.
    ``fetch`` turns an output into what the caller keeps (the worker starts the copy back
    to the host there, without waiting for it). When the batched forward raises or its
    outputs cannot be split by request, every request runs alone, so that only the one
    at fault gets an error.
    """
    n = len(sizes)

    def one(j: int) -> list[torch.Tensor] | BaseException:
        try:
            return [fetch(o) for o in model.forward(alone(j))]
        except Exception as e:  # the model's fault, reported to this request's client
            return e

    if n > 1 and keys[0] is not None and all(k == keys[0] for k in keys):
        total = sum(sizes)
        try:
            outputs = model.forward(stacked())
            if outputs and all(o.dim() and o.shape[0] == total for o in outputs):
                return GroupResult(list(sizes), [fetch(o) for o in outputs])
        except Exception:
            pass  # find out whose input fails: below
    # One request, requests the planner would not have grouped, or a failed batch.
    return GroupResult(list(sizes), None, [one(j) for j in range(n)])


def run_batch(
    model: LoadedModel, requests: Sequence[Sequence[torch.Tensor]]
) -> list[list[torch.Tensor] | BaseException]:
    """Run ``requests`` (each a list of positional inputs) as one forward when possible.

    Returns one entry per request: its outputs, or the exception its forward raised.
    When the batched forward raises or its outputs cannot be split by request, every
    request is run alone so that only the one at fault gets an error.
    """
    sizes = [int(r[0].shape[0]) if r and r[0].dim() else 1 for r in requests]
    return forward_group(
        model,
        sizes,
        [batch_key(r) for r in requests],
        lambda: [torch.cat(list(parts)) for parts in zip(*requests, strict=True)],
        lambda j: list(requests[j]),
    ).split()
