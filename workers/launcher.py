"""Launching a gathered batch: its requests grouped by input layout, each group's
forward replayed as a CUDA graph or run as the model, and the copies of its outputs
back to the host queued behind it. ``workers.serve`` decides when; this decides how.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from workers.batching import GroupResult, forward_group, plan_batches
from workers.graphs import GraphTable
from workers.loader import LoadedModel
from workers.pipeline import Gather, Launched, Pending, inputs_of
from workers.staging import Stager

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


class Launcher:
    """The loaded model on its device, its captured graphs, and the rows per forward
    launched since the last heartbeat."""

    def __init__(self, wid: str, max_batch: int) -> None:
        self.wid = wid
        self.max_batch = max(1, max_batch)
        self.model: LoadedModel | None = None
        self.device = CPU
        self.graphs: GraphTable | None = None
        self.copy_stream: Any = None  # host-to-device copies for graph replays
        self.batch_sizes: dict[int, int] = {}
        # False once the contract shows outputs that do not follow the batch: every
        # request then gets a forward of its own (its rows could not be told apart).
        self.batchable = True

    def use_graphs(self, table: GraphTable) -> None:
        """Replay ``table``'s graphs from now on, their inputs copied on a stream of their
        own (the device is a GPU: graphs are captured only there)."""
        self.graphs = table
        self.copy_stream = torch.cuda.Stream(self.device)

    def take_batch_sizes(self) -> dict[int, int]:
        """Rows per forward -> forwards, since the previous call (for the heartbeat)."""
        sizes, self.batch_sizes = self.batch_sizes, {}
        return sizes

    def launch(self, gather: Gather) -> Launched:
        """Queue the gather's forwards on the device (one per compatible group) and the
        copies of their outputs back to pinned host memory; on a CPU they simply run."""
        assert self.model is not None
        t0 = time.monotonic()
        model = self.model
        requests = gather.requests
        stager = gather.stager
        stager.settle()  # every staged byte is in the arena before anything reads it
        max_batch = self.max_batch
        first = requests[0].layout.bkey
        same = first is not None and all(r.layout.bkey == first for r in requests)
        if not self.batchable:
            plan = [[r] for r in requests]
        elif same and gather.rows <= max_batch:
            plan = [requests]  # the usual case: one shape, one batch
        else:
            plan = [
                [requests[i] for i in group]
                for group in plan_batches(
                    [r.layout.bkey for r in requests],
                    [r.layout.size for r in requests],
                    max_batch,
                )
            ]

        def fetch(out: torch.Tensor) -> torch.Tensor:
            if out.device.type == "cuda":
                return out.to(CPU, non_blocking=True)  # into pinned memory; read after the event
            # A CPU model may answer with (a view of) its input: it must not point into
            # the arena, which the next batch overwrites.
            return out.clone() if stager.owns(out) else out

        start = None
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)  # when the device gets to it
            start.record()
        groups: list[tuple[list[Pending], GroupResult]] = []
        for members in plan:
            sizes = [r.layout.size for r in members]
            rows = sum(sizes)
            self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1

            def stacked(members: list[Pending] = members) -> list[torch.Tensor]:
                return inputs_of(members, stager.batch)

            def alone(j: int, members: list[Pending] = members) -> list[torch.Tensor]:
                return inputs_of(members[j : j + 1], stager.batch)

            keys = [r.layout.bkey for r in members]
            result = None
            if self.graphs is not None and all(k == keys[0] for k in keys):
                result = self.replay(members, sizes, rows, stager, fetch)
            if result is None:
                result = forward_group(model, sizes, keys, stacked, alone, fetch)
            groups.append((members, result))
        launched = Launched(groups, self.record(gather), gather.rows, start)
        launched.host_s = time.monotonic() - t0
        return launched

    def replay(
        self,
        members: list[Pending],
        sizes: list[int],
        rows: int,
        stager: Stager,
        fetch: Callable[[torch.Tensor], torch.Tensor],
    ) -> GroupResult | None:
        """The group's forward as a CUDA graph replay, when one was captured for its
        signature and size; None sends it down the ordinary path."""
        assert self.graphs is not None
        graph = self.graphs.find(members[0].layout.bkey, rows)
        if graph is None or (graph.exact and len(members) != 1):
            return None
        try:
            batch = inputs_of(members, stager.host_batch)
            if self.copy_stream is not None:
                # Host to device on the copy stream, overlapping the batch ahead; the
                # replay then reads a device copy once the copy stream is done.
                mirrored = [stager.to_device(block, self.copy_stream) for block in batch]
                if all(m is not None for m in mirrored):
                    torch.cuda.current_stream().wait_stream(self.copy_stream)
                    batch = [m for m in mirrored if m is not None]
            # The graph's outputs are overwritten by its next replay: a copy is answered
            # (to pinned host memory on a GPU; tests replay simulated graphs on a CPU).
            outputs = graph.run(batch, rows)
            kept = [fetch(out) if out.is_cuda else out.clone() for out in outputs]
            if graph.exact:
                # A model that cannot batch: one request, answered whole (its outputs
                # need not have the rows first).
                return GroupResult(sizes, None, [kept])
            return GroupResult(sizes, kept)
        except Exception as exc:  # e.g. out of pinned memory: the ordinary path may cope
            log.warning("worker %s: graph replay failed (%s); running it eagerly", self.wid, exc)
            return None

    @property
    def asynchronous(self) -> bool:
        """Whether a launch returns before its forward has run (then ``record`` gives an
        event to wait for): on a GPU."""
        return self.device.type == "cuda"

    def record(self, gather: Gather) -> Any:
        """An event completing once everything queued on the device so far has run, the
        copies of the outputs to the host included; None on a CPU, where it has."""
        if self.device.type != "cuda":
            return None
        # Its waiter sleeps rather than spins; timed, for the pacing clock.
        event = torch.cuda.Event(blocking=True, enable_timing=True)
        event.record()
        return event
