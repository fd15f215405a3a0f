"""CUDA graphs of the model's forward, one per batch size, for the worker's batches.

Launching a TorchScript forward costs the CPU one interpreter step and one kernel launch
per op: about 4-7 ms for resnet50 on an H100 host, more than the GPU needs to run a
batch of 32 of it. A CUDA graph records those launches once and replays them as one,
in microseconds of CPU. A graph has fixed shapes, so the worker captures one per input
signature (dtype and shape after the batch dimension, per input) at a ladder of batch
sizes up to ``max_batch``; a batch of ``n`` rows replays the smallest graph of at least
``n`` rows, the rows after ``n`` holding whatever an earlier batch left there (the
rows of a batchable model are independent, which batching assumes anyway), and only
the first ``n`` rows of its outputs are read.

A graph's inputs and outputs are fixed device tensors: a batch is copied into the
inputs, and its outputs must be copied out (the worker queues the copy to pinned host
memory right after the replay, on the same stream) before the next replay writes them.
All graphs read one set of input tensors (each the first rows of it) and draw their
intermediate memory from one pool, captured largest first, so they cost about as much
device memory as the largest one alone.

A model that cannot be batched (its contract says so: ``pool.contract``) runs each
request alone, and a batch of several rows is not a thing it can be given: capturing it
at the ladder's sizes would run it on shapes it refuses. Its graphs are captured only at
the shapes it was warmed up on, each replayed for a request of exactly that shape, its
outputs answered whole (see ``capture_sizes``).

A model whose forward cannot be captured (it synchronises with the host, or its output
shape depends on data), fails on the capture's inputs, or whose replayed outputs differ
from an ordinary forward on the same inputs keeps the ordinary path for that signature;
the worker logs why.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from workers.batching import BatchKey, batch_key
from workers.loader import LoadedModel

log = logging.getLogger(__name__)

# Ordinary and replayed forwards of the same inputs are compared with these tolerances
# (cuDNN may pick another algorithm for the eager run; a broken capture differs by far
# more than this).
TOLERANCE = {
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float32: (1e-3, 1e-4),
    torch.float64: (1e-6, 1e-8),
}
WARM_RUNS = 1  # ordinary forwards at each size before its capture


def batch_ladder(max_batch: int) -> list[int]:
    """The batch sizes captured: every size up to 32, every 4 up to 64, every 16 above,
    and ``max_batch`` itself. A batch replays the next size up, and the padding rows are
    device time wasted: with 64 clients batches hover around 20 to 30 rows, where a
    step of 8 cost a tenth of the throughput and a step of 4 still several percent."""
    top = max(1, max_batch)
    sizes = set(range(1, min(top, 32) + 1))
    sizes.update(range(36, min(top, 64) + 1, 4))
    sizes.update(range(80, top + 1, 16))
    sizes.add(top)
    return sorted(sizes)


def capture_sizes(batchable: bool, max_batch: int, example_rows: int) -> list[int]:
    """The batch sizes to capture a signature at, for an example of ``example_rows`` rows:
    a batchable model at the whole ladder (any batch up to ``max_batch`` may come); one
    that cannot batch only at the example's own rows, the one shape it was shown to take
    (each of its requests runs alone, at its own size)."""
    if batchable:
        return batch_ladder(max_batch)
    return [max(1, example_rows)]


class GraphCaptureError(RuntimeError):
    """One signature's graphs could not be captured, or did not match the model."""


class CapturedForward:
    """The model's forward at ``rows`` rows of one signature, as a replayable graph.
    ``exact``: captured for a model that cannot batch, replayed only for a request of
    exactly ``rows`` rows, its outputs whole (they need not have the rows first)."""

    __slots__ = ("exact", "graph", "inputs", "outputs", "rows")

    def __init__(
        self,
        rows: int,
        graph: torch.cuda.CUDAGraph,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        exact: bool = False,
    ) -> None:
        self.rows = rows
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs
        self.exact = exact

    def run(self, batch: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
        """Replay on ``batch`` (one tensor per input, ``rows`` rows each, on the host or
        the device). Returns views of the first ``rows`` rows of the graph's outputs (an
        exact graph's outputs whole): copy them out before the next replay of any graph
        of the same table."""
        for static, part in zip(self.inputs, batch, strict=True):
            static[:rows].copy_(part, non_blocking=True)
        self.graph.replay()
        if self.exact:
            return list(self.outputs)
        return [out[:rows] for out in self.outputs]


class GraphTable:
    """Captured forwards by signature, each signature's sorted by rows."""

    def __init__(self) -> None:
        self.by_key: dict[BatchKey, list[CapturedForward]] = {}
        self._rows: dict[BatchKey, list[int]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_key.values())

    def add(self, key: BatchKey, forwards: list[CapturedForward]) -> None:
        """Add ``key``'s graphs (to those it has: a model that cannot batch has one per
        row count it was warmed up at)."""
        forwards = sorted([*self.by_key.get(key, ()), *forwards], key=lambda f: f.rows)
        self.by_key[key] = forwards
        self._rows[key] = [f.rows for f in forwards]

    def find(self, key: Any, rows: int) -> CapturedForward | None:
        """The smallest graph of ``key`` with room for ``rows`` rows, if any; an exact
        graph only for exactly its own rows (a padded batch is not one request)."""
        sizes = self._rows.get(key)
        if not sizes:
            return None
        i = bisect.bisect_left(sizes, rows)
        if i == len(sizes):
            return None
        graph = self.by_key[key][i]
        return None if graph.exact and graph.rows != rows else graph

    def describe(self) -> dict[str, Any]:
        """For the worker's ready event: signatures and the batch sizes captured."""
        return {
            "signatures": len(self.by_key),
            "sizes": sorted({f.rows for fs in self.by_key.values() for f in fs}),
        }


def sample_rows(example: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """``example``'s inputs with their first dimension cycled out (or cut) to ``rows``."""
    out = []
    for t in example:
        have = int(t.shape[0])
        index = torch.arange(rows, device=t.device) % have
        out.append(t.index_select(0, index).contiguous())
    return out


def capture_signature(
    model: LoadedModel,
    example: Sequence[torch.Tensor],
    sizes: Sequence[int],
    pool: Any,
    exact: bool = False,
) -> list[CapturedForward]:
    """Capture ``model`` at each of ``sizes`` (largest first, sharing ``pool``) for the
    signature of ``example``, checking each replay against an ordinary forward.
    ``exact``: for a model that cannot batch (its outputs are answered whole)."""
    captured: list[CapturedForward] = []
    side = torch.cuda.Stream(model.device)
    # One set of input tensors for all sizes: each graph reads the first rows of it.
    shared = sample_rows(example, max(sizes))
    for rows in sorted(sizes, reverse=True):
        inputs = [t[:rows] for t in shared]
        # Warm-up off the default stream, as capture needs: lazy initialisation (cuBLAS
        # handles, the TorchScript executor's specialisation to this shape) must not
        # happen inside the capture.
        side.wait_stream(torch.cuda.current_stream(model.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(WARM_RUNS):
                    expected = model.forward(inputs)
            torch.cuda.current_stream(model.device).wait_stream(side)
            torch.cuda.synchronize(model.device)
        except Exception as exc:  # the model refuses this shape: no graphs for it
            raise GraphCaptureError(f"the model fails at {rows} rows: {exc}") from exc
        refuse_host_syncs(model, inputs, side)
        if not expected:
            raise GraphCaptureError("the model returned no outputs")
        if not exact and any(o.dim() == 0 or o.shape[0] != rows for o in expected):
            raise GraphCaptureError(
                f"outputs do not have the batch's {rows} rows first: cannot cut them per request"
            )
        graph = torch.cuda.CUDAGraph()
        try:
            outputs = capture_forward(graph, pool, model, inputs)
        except Exception as exc:
            raise GraphCaptureError(f"capture at {rows} rows failed: {exc}") from exc
        graph.replay()
        torch.cuda.synchronize(model.device)
        check_same(outputs, expected, rows)
        captured.append(CapturedForward(rows, graph, inputs, outputs, exact))
    return captured


def refuse_host_syncs(model: LoadedModel, inputs: Sequence[torch.Tensor], side: Any) -> None:
    """Raise GraphCaptureError when the forward waits for the device from the host (a
    ``bool(tensor)``, ``.item()``, ``nonzero``): found by an ordinary forward under
    CUDA's sync-debug mode, before any capture. A capture broken by such a sync leaves
    the CUDA state of the process unfit for random ops afterwards (seen on an H200:
    "Offset increment outside graph capture"), so it is never started."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            model.forward(inputs)
    except RuntimeError as exc:
        raise GraphCaptureError(
            f"capture at {len(inputs[0])} rows refused: the forward "
            f"synchronises with the host ({exc})"
        ) from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.current_stream(model.device).wait_stream(side)


def capture_forward(
    graph: Any, pool: Any, model: LoadedModel, inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """One forward captured into ``graph`` on a stream of its own.

    Not ``torch.cuda.graph``: when its capture fails, that context manager's exit raises
    from ``capture_end`` before it restores the caller's stream, so the worker would go
    on with a capture stream as its current one, and the next random op anywhere (a
    model's ``torch.rand``) fails with "Offset increment outside graph capture". Here a
    failed capture is always ended and the stream always put back."""
    device = model.device
    torch.cuda.synchronize(device)
    before = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(before)
    torch.cuda.set_stream(stream)
    try:
        graph.capture_begin(pool=pool)
        try:
            outputs = model.forward(inputs)
        except BaseException:
            try:
                graph.capture_end()  # ends the stream's capture even when it fails
            except Exception as exc:  # an invalidated capture says so here; it is over
                log.debug("abandoned capture: %s", exc)
            raise
        graph.capture_end()
    finally:
        torch.cuda.set_stream(before)
    if torch.cuda.is_current_stream_capturing():  # never expected: do not go on capturing
        raise RuntimeError("the CUDA stream is still capturing after capture_end")
    return list(outputs)


def check_same(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rows: int) -> None:
    if len(got) != len(expected):
        raise GraphCaptureError(f"replay gave {len(got)} outputs, the model {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape or g.dtype != e.dtype:
            raise GraphCaptureError(f"output {i} at {rows} rows: replay and model disagree")
        rtol, atol = TOLERANCE.get(e.dtype, (0.0, 0.0))
        if not torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            raise GraphCaptureError(
                f"output {i} at {rows} rows: replayed values differ from the model's"
            )


def capture_plan(
    examples: Sequence[Sequence[Any]], batchable: bool, max_batch: int
) -> list[tuple[int, BatchKey, list[int]]]:
    """Which examples get graphs, and at which sizes: ``(index into examples, batch key,
    sizes)``, one per signature (per signature and row count for a model that cannot
    batch, see ``capture_sizes``). Examples without a batch dimension are left out.
    Decides only: no device is touched (tests run it on a CPU)."""
    plan: list[tuple[int, BatchKey, list[int]]] = []
    seen: set[tuple[BatchKey, int]] = set()
    for i, example in enumerate(examples):
        key = batch_key(example)
        if key is None:
            continue
        rows = int(example[0].shape[0])
        mark = (key, 0 if batchable else rows)
        if mark in seen:
            continue
        seen.add(mark)
        plan.append((i, key, capture_sizes(batchable, max_batch, rows)))
    return plan


def capture_graphs(
    model: LoadedModel,
    examples: Sequence[Sequence[torch.Tensor]],
    max_batch: int,
    batchable: bool = True,
) -> tuple[GraphTable, list[str]]:
    """Graphs for every signature among ``examples`` (the warm-up sets) that has a batch
    dimension, at the sizes ``capture_plan`` gives (``batchable``: the contract's).
    Returns the table and, per signature left out, why."""
    table = GraphTable()
    problems: list[str] = []
    if model.device.type != "cuda":
        return table, ["not on a CUDA device"]
    plan = capture_plan(examples, batchable, max_batch)
    if not plan:
        problems.append("no input example with a batch dimension to capture with")
        return table, problems
    pool = torch.cuda.graph_pool_handle()
    for index, key, sizes in plan:
        t = time.monotonic()
        try:
            forwards = capture_signature(model, examples[index], sizes, pool, not batchable)
        except GraphCaptureError as exc:
            problems.append(f"{describe_key(key)}: {exc}")
            torch.cuda.synchronize(model.device)  # a device error surfaces here, not later
            continue
        table.add(key, forwards)
        log.debug("captured %s at %s in %.2fs", describe_key(key), sizes, time.monotonic() - t)
    return table, problems


def describe_key(key: BatchKey) -> str:
    return ", ".join(
        f"{str(dtype).removeprefix('torch.')}[N{''.join(f',{d}' for d in shape)}]"
        for dtype, shape in key
    )
