"""Dynamic batching: batch keys, batch planning, the staging arena, the reply codec, and
batched answers that equal the unbatched ones request by request, from ``run_batch`` up
to the worker's pipelined serving loop and a real pool."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from modelkit import make_factory_model, make_mlp, make_two_input, mlp_input, mlp_reference
from poolkit import in_threads, running_pool

from router.client import Client
from router.errors import ModelError
from workers.batching import batch_key, plan_batches, run_batch
from workers.codec import (
    INLINE_LIMIT,
    TORCH_DTYPES,
    WIRE_DTYPES,
    HostOutputs,
    ReplyEncoder,
    RequestLayout,
    decode_inputs,
    encode_outputs,
)
from workers.copier import NativeCopier, ThreadCopier
from workers.graphs import CapturedForward, GraphTable
from workers.lane import Lane
from workers.lane import pack as lane_pack
from workers.lane import unpack as lane_unpack
from workers.launcher import Launcher
from workers.loader import LoadedModel, ModelOutputError, load_model
from workers.main import WorkerSpec
from workers.pipeline import Gather, Launched
from workers.serve import Worker
from workers.staging import Staged, Stager, TensorSpec

CPU = torch.device("cpu")

# Received frames are wrapped read-only on purpose (workers/codec.py silences torch's
# warning at import, but pytest's filterwarnings = error resets the filters per test).
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable:UserWarning")


class CountingModel(LoadedModel):
    """A LoadedModel that records the first-dim size of every forward it runs."""

    calls: list[int]

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(int(inputs[0].shape[0]) if inputs and inputs[0].dim() else -1)
        return super().forward(inputs)


def _counting(model: LoadedModel) -> CountingModel:
    counted = CountingModel(model.module, model.device, model.format, model.num_inputs)
    counted.calls = []
    return counted


@pytest.fixture(scope="module")
def eager_mlp(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    # Same weights as `mlp`; eager, so new shapes cost no TorchScript re-profiling.
    return load_model(make_factory_model(str(tmp_path_factory.mktemp("f")), seed=7), CPU)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_mlp(str(tmp_path_factory.mktemp("mlp") / "m.pt"), seed=7, manifest=False)
    return load_model(path, CPU)


# ---------------------------------------------------------------- batch_key


def test_batch_key_ignores_batch_dim_only() -> None:
    a = batch_key([torch.zeros(1, 16), torch.zeros(1, 3, dtype=torch.int64)])
    b = batch_key([torch.zeros(7, 16), torch.zeros(7, 3, dtype=torch.int64)])
    assert a == b == ((torch.float32, (16,)), (torch.int64, (3,)))
    assert batch_key([torch.zeros(1, 16)]) != batch_key([torch.zeros(1, 16, dtype=torch.float16)])
    assert batch_key([torch.zeros(1, 16)]) != batch_key([torch.zeros(1, 17)])
    assert batch_key([torch.zeros(1, 16)]) != batch_key([torch.zeros(1, 16), torch.zeros(1, 16)])
    assert batch_key([torch.zeros(3)]) == ((torch.float32, ()),)


@pytest.mark.parametrize(
    "inputs",
    [
        [],
        [torch.tensor(1.0)],
        [torch.zeros(2, 4), torch.tensor(3)],
        [torch.zeros(2, 4), torch.zeros(3, 4)],  # rows could not be attributed
    ],
)
def test_unbatchable_requests_have_no_key(inputs: list[torch.Tensor]) -> None:
    assert batch_key(inputs) is None


# ---------------------------------------------------------------- plan_batches


@pytest.mark.parametrize(
    ("keys", "sizes", "max_batch", "expected"),
    [
        ([], [], 8, []),
        (["a", "a", "a"], [1, 2, 3], 8, [[0, 1, 2]]),
        (["a", "a"], [4, 4], 8, [[0, 1]]),  # exactly full
        (["a", "a", "a"], [3, 3, 3], 6, [[0, 1], [2]]),
        (["a", "b", "a", "b"], [1, 1, 1, 1], 8, [[0, 2], [1, 3]]),
        (["a", None, "a"], [1, 1, 1], 8, [[0, 2], [1]]),
        ([None, None], [1, 1], 8, [[0], [1]]),
        (["a", "a", "a"], [2, 10, 2], 8, [[0, 2], [1]]),  # too big: alone
        (["a", "a", "a"], [5, 5, 1], 6, [[0], [1, 2]]),  # a full batch is closed
        (["a", "a"], [1, 1], 1, [[0], [1]]),
        (["a", "a"], [1, 1], 0, [[0], [1]]),  # < 1 means no batching
        (["a", "a", "a"], [0, 8, 0], 8, [[0, 1, 2]]),  # empty requests cost no rows
    ],
)
def test_plan_batches(
    keys: list[str | None], sizes: list[int], max_batch: int, expected: list[list[int]]
) -> None:
    assert plan_batches(keys, sizes, max_batch) == expected


def test_plan_batches_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 keys but 1 sizes"):
        plan_batches(["a", "a"], [1], 8)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(0, 12)), max_size=30
    ),
    max_batch=st.integers(1, 16),
)
@pytest.mark.slow
def test_plan_batches_invariants(requests: list[tuple[str | None, int]], max_batch: int) -> None:
    keys = [k for k, _ in requests]
    sizes = [s for _, s in requests]
    batches = plan_batches(keys, sizes, max_batch)
    # every request exactly once
    assert sorted(i for b in batches for i in b) == list(range(len(requests)))
    # batches in order of their first request, arrival order inside each
    assert [b[0] for b in batches] == sorted(b[0] for b in batches)
    for b in batches:
        assert b == sorted(b)
        if len(b) > 1:
            assert keys[b[0]] is not None and all(keys[i] == keys[b[0]] for i in b)
            assert sum(sizes[i] for i in b) <= max_batch
    # no key, or bigger than max_batch: alone
    for i, (key, size) in enumerate(requests):
        if key is None or size > max_batch:
            assert [i] in batches


# ---------------------------------------------------------------- run_batch


def _rows(*sizes: int, seed: int = 0) -> list[list[torch.Tensor]]:
    x = mlp_input(sum(sizes), seed=seed)
    bounds = np.cumsum([0, *sizes])
    return [[torch.from_numpy(x[a:b].copy())] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.slow
def test_batched_answers_equal_unbatched(mlp: LoadedModel) -> None:
    model = _counting(mlp)
    requests = _rows(1, 3, 2, 1)
    batched = run_batch(model, requests)
    assert model.calls == [7]  # one forward for all four requests
    for req, got in zip(requests, batched, strict=True):
        assert isinstance(got, list) and len(got) == 1
        (alone,) = mlp.forward(req)
        assert got[0].shape == alone.shape == (req[0].shape[0], 4)
        torch.testing.assert_close(got[0], alone, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            got[0].numpy(), mlp_reference(7, req[0].numpy()), rtol=1e-5, atol=1e-6
        )


def test_single_request_is_a_plain_forward(mlp: LoadedModel) -> None:
    model = _counting(mlp)
    (req,) = _rows(3)
    (got,) = run_batch(model, [req])
    assert model.calls == [3]
    assert isinstance(got, list) and torch.equal(got[0], mlp.forward(req)[0])
    assert run_batch(model, []) == []


def test_tuple_outputs_are_split_per_request(tmp_path: Path) -> None:
    model = _counting(load_model(make_two_input(str(tmp_path / "two.pt")), CPU))
    gen = torch.Generator().manual_seed(1)
    requests = [
        [torch.randn(n, 4, generator=gen), torch.randn(n, 4, generator=gen)] for n in (2, 1, 3)
    ]
    results = run_batch(model, requests)
    assert model.calls == [6]
    for (a, b), got in zip(requests, results, strict=True):
        assert isinstance(got, list)
        assert torch.equal(got[0], a + b) and torch.equal(got[1], a * b)


def test_failing_request_gets_its_own_error(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), 3, forward="raise_if_negative")
    model = _counting(load_model(path, CPU))
    requests = _rows(2, 1, 2)
    requests[1] = [-requests[1][0] - 1.0]
    results = run_batch(model, requests)
    assert model.calls == [5, 2, 1, 2]  # the batch failed, then each alone
    assert isinstance(results[1], ValueError) and "negative input" in str(results[1])
    for i in (0, 2):
        got = results[i]
        assert isinstance(got, list)
        np.testing.assert_allclose(
            got[0].numpy(), mlp_reference(3, requests[i][0].numpy()), rtol=1e-5, atol=1e-6
        )


class _SumRows(torch.nn.Module):
    """Not row-independent: one output row for the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0, keepdim=True)


class _Total(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class _Dict(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


def _eager(module: torch.nn.Module) -> CountingModel:
    model = CountingModel(module, CPU, "safetensors", 1)
    model.calls = []
    return model


@pytest.mark.parametrize("module", [_SumRows(), _Total()])
def test_unsplittable_output_falls_back_to_one_by_one(module: torch.nn.Module) -> None:
    model = _eager(module)
    requests = [[torch.ones(2, 3)], [torch.full((3, 3), 2.0)]]
    results = run_batch(model, requests)
    assert model.calls == [5, 2, 3]
    for req, got in zip(requests, results, strict=True):
        assert isinstance(got, list) and torch.equal(got[0], module(req[0]))


def test_incompatible_requests_run_alone_without_concatenation() -> None:
    model = _eager(_SumRows())
    requests = [[torch.ones(2, 3)], [torch.ones(1, 4)], [torch.tensor(5.0)]]
    results = run_batch(model, requests)
    assert model.calls == [2, 1, -1]
    assert [tuple(r[0].shape) for r in results if isinstance(r, list)] == [(1, 3), (1, 4), ()]


def test_bad_output_type_is_reported_per_request() -> None:
    results = run_batch(_eager(_Dict()), [[torch.ones(1, 2)], [torch.ones(2, 2)]])
    assert len(results) == 2
    assert all(isinstance(r, ModelOutputError) and "got dict" in str(r) for r in results)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    max_batch=st.integers(1, 12),
    seed=st.integers(0, 1000),
)
def test_planned_batches_answer_like_single_requests(
    eager_mlp: LoadedModel, sizes: list[int], max_batch: int, seed: int
) -> None:
    # What the worker does: key, plan, run each batch; every request's answer must be
    # the one it would have got alone.
    requests = _rows(*sizes, seed=seed)
    plan = plan_batches([batch_key(r) for r in requests], sizes, max_batch)
    answers: dict[int, list[torch.Tensor] | BaseException] = {}
    for batch in plan:
        results = run_batch(eager_mlp, [requests[i] for i in batch])
        for i, result in zip(batch, results, strict=True):
            answers[i] = result
    assert sorted(answers) == list(range(len(requests)))
    for i, req in enumerate(requests):
        got = answers[i]
        assert isinstance(got, list)
        torch.testing.assert_close(got[0], eager_mlp.forward(req)[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- staging arena


def _spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(t.dtype, tuple(t.shape), t.numel() * t.element_size())


def _layout(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...]] | None:
    return (t.dtype, tuple(t.shape[1:])) if t.dim() else None


def _put(stager: Stager, t: torch.Tensor) -> Staged:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # as a frame's bytes
    return stager.put(raw, _spec(t), _layout(t))


def test_puts_of_one_layout_are_one_block_without_a_copy() -> None:
    stager = Stager(CPU, pinned=False)
    stager.reserve(1 << 20)
    parts = [torch.randn(n, 4, 3) for n in (1, 2, 1)]
    staged = [_put(stager, t) for t in parts]
    assert all(isinstance(s, int) for s in staged)
    block = stager.batch(staged, [_spec(t) for t in parts])
    assert torch.equal(block, torch.cat(parts))
    assert stager.owns(block) and block.data_ptr() == stager.arena.data_ptr() + staged[0]
    # Each staged input reads back as itself, alone too.
    for s, t in zip(staged, parts, strict=True):
        assert torch.equal(stager.batch([s], [_spec(t)]), t)


@pytest.mark.parametrize("kind", ["thread", "native"])
def test_copies_on_the_copier_threads_are_in_the_arena_once_settled(kind: str) -> None:
    copier: ThreadCopier | NativeCopier = ThreadCopier() if kind == "thread" else NativeCopier(2)
    try:
        stager = Stager(CPU, pinned=False, copier=copier)
        stager.reserve(1 << 22)
        gen = torch.Generator().manual_seed(3)
        parts = [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(21)]  # 3 handovers
        staged = [_put(stager, t) for t in parts]
        if kind == "thread":  # lists of 8: two handed over, five still to hand over
            assert len(stager.handed) == 2 and len(stager.pending) == 5
        else:  # each copy handed over as it is put
            assert len(stager.handed) == 21 and not stager.pending
        stager.settle()
        assert not stager.pending and not stager.handed
        assert torch.equal(stager.batch(staged, [_spec(t) for t in parts]), torch.cat(parts))
        # A copy that fails is reported where the arena would be read.
        stager.reset()
        stager.pending.append((stager.arena.data_ptr(), object()))  # not a buffer
        with pytest.raises(RuntimeError, match="staging copy failed"):
            stager.settle()
    finally:
        copier.close()


def test_interleaved_layouts_are_concatenated_in_the_arena() -> None:
    stager = Stager(CPU, pinned=False)
    stager.reserve(1 << 20)
    a, b, c = torch.randn(1, 4), torch.randn(2, 3).half(), torch.randn(3, 4)
    sa, sb, sc = (_put(stager, t) for t in (a, b, c))
    assert isinstance(sb, int) and sb % 256 == 0  # a new layout starts aligned
    block = stager.batch([sa, sc], [_spec(a), _spec(c)])
    assert torch.equal(block, torch.cat([a, c])) and stager.owns(block)
    assert torch.equal(stager.batch([sb], [_spec(b)]), b)


def test_a_full_arena_gives_inputs_their_own_memory_then_grows() -> None:
    stager = Stager(CPU, pinned=False)
    stager.reserve(1)  # the minimum: 64 KiB
    size = stager.arena.numel()
    parts = [torch.randn(1, 4096) for _ in range(6)]  # 16 KiB each, 96 KiB in all
    staged = [_put(stager, t) for t in parts]
    assert any(isinstance(s, torch.Tensor) for s in staged)
    block = stager.batch(staged, [_spec(t) for t in parts])
    assert torch.equal(block, torch.cat(parts))
    stager.reset()
    assert stager.arena.numel() > size
    staged = [_put(stager, t) for t in parts]
    assert all(isinstance(s, int) for s in staged)
    assert torch.equal(stager.batch(staged, [_spec(t) for t in parts]), torch.cat(parts))


def test_empty_and_scalar_inputs_stage() -> None:
    stager = Stager(CPU, pinned=False)
    stager.reserve(1 << 16)
    for t in (
        torch.tensor(2.5),
        torch.zeros(0, 3),
        torch.zeros(2, 0),
        torch.tensor([], dtype=torch.int64),
    ):
        s = _put(stager, t)
        got = stager.batch([s], [_spec(t)])
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    empties = [torch.zeros(n, 0) for n in (1, 2)]
    staged = [_put(stager, t) for t in empties]
    assert stager.batch(staged, [_spec(t) for t in empties]).shape == (3, 0)


def test_launch_staging_passes_a_lone_tensor_through() -> None:
    # The CPU default: inputs are the received frames, concatenated only when batched.
    stager = Stager(CPU, pinned=False)
    x, y = torch.randn(2, 5), torch.randn(1, 5)
    assert stager.batch([x], [_spec(x)]) is x
    both = stager.batch([x, y], [_spec(x), _spec(y)])
    assert torch.equal(both, torch.cat([x, y])) and not stager.owns(both)  # no arena yet
    stager.reset()  # the next batch finds an arena its size
    both = stager.batch([x, y], [_spec(x), _spec(y)])
    assert torch.equal(both, torch.cat([x, y])) and stager.owns(both)


# ---------------------------------------------------------------- reply and request codec


@pytest.mark.parametrize("rid", [None, "r-17", 42])
def test_reply_pieces_decode_like_the_plain_map(rid: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    outputs = [
        torch.randn(5, 1000, generator=gen).half(),  # a classifier's rows: inline
        torch.randn(5, 3, 2000, generator=gen),  # 24 KB a row: frames
        torch.arange(10).reshape(5, 2),
        torch.randn(5, 2, generator=gen).bfloat16(),
        torch.zeros(5, 0),
    ]
    host = HostOutputs(outputs)
    encoder = ReplyEncoder("net", "3")
    for start, stop in ((0, 1), (1, 3), (3, 5), (0, 5)):
        header, frames = encoder.encode(host, start, stop, rid)
        got = msgpack.unpackb(header, raw=False)
        assert got["ok"] is True and got["model"] == "net" and got["version"] == "3"
        assert got.get("id") == rid and ("id" in got) == (rid is not None)
        frames_left = iter(frames)
        for entry, full in zip(got["outputs"], outputs, strict=True):
            want = full[start:stop].contiguous()
            data = entry.get("data")
            raw = bytes(next(frames_left) if data is None else data)
            assert (data is None) == (len(raw) > INLINE_LIMIT)
            assert entry["dtype"] == WIRE_DTYPES[want.dtype] and entry["shape"] == list(want.shape)
            assert raw == bytes(want.reshape(-1).view(torch.uint8).numpy())
        assert next(frames_left, None) is None


def test_whole_outputs_encode_like_before() -> None:
    header, frames = encode_outputs([torch.tensor(1.5), torch.ones(2, 3)], "m", "v", None)
    assert msgpack.unpackb(header, raw=False) == {
        "ok": True,
        "model": "m",
        "version": "v",
        "outputs": [
            {"dtype": "float32", "shape": [], "data": torch.tensor(1.5).numpy().tobytes()},
            {"dtype": "float32", "shape": [2, 3], "data": torch.ones(2, 3).numpy().tobytes()},
        ],
    }
    assert frames == []
    with pytest.raises(TypeError, match="not supported on the wire"):
        encode_outputs([torch.zeros(2, dtype=torch.complex64)], "m", "v", None)


def test_request_layout_checks_frames_against_its_header() -> None:
    x = torch.randn(2, 8)
    header = {
        "model": "m",
        "id": 9,
        "inputs": [
            {"dtype": "float32", "shape": [2, 8]},
            {"dtype": "int64", "shape": [2], "data": torch.arange(2).numpy().tobytes()},
        ],
    }
    frame = memoryview(x.numpy()).cast("B")
    tensors = decode_inputs(header, [frame])
    layout = RequestLayout(header, tensors)
    assert layout.rid == 9 and layout.size == 2 and layout.bkey == batch_key(tensors)
    assert layout.fits([frame]) and not layout.fits([frame[:-4]]) and not layout.fits([])
    again = layout.tensors([frame])
    assert all(torch.equal(a, b) for a, b in zip(again, tensors, strict=True))


# ---------------------------------------------------------------- the pipelined serving loop
#
# The GPU's loop, run on the CPU: each launch "runs on the device" for a few milliseconds
# after it was queued (a fake event), so requests are taken and staged into the other
# gather while it runs, exactly as with CUDA. The worker runs in this process on a thread,
# over real ZeroMQ sockets; the test is its router.


class _Affine(torch.nn.Module):
    """Elementwise, so any dtype and shape batches; refuses negative input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() and bool((x < 0).any()):
            raise ValueError("negative input")
        return x * 2 + 1


class _FakeEvent:
    """Completes ``delay`` seconds after it was recorded, like a forward on a GPU; keeps a
    copy of its gather's staged bytes, to catch the loop overwriting them meanwhile."""

    def __init__(self, delay: float, stager: Stager) -> None:
        self.due = time.monotonic() + delay
        self.stager = stager
        self.snapshot = bytes(stager.mem[: stager.offset])

    def query(self) -> bool:
        return time.monotonic() >= self.due

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.due - time.monotonic()))

    def intact(self) -> bool:
        return bytes(self.stager.mem[: len(self.snapshot)]) == self.snapshot


class _PipelinedLauncher(Launcher):
    """Launches that "complete" later, as on a GPU, though the forward ran on the CPU."""

    delay = 0.004
    launches = 0

    @property
    def asynchronous(self) -> bool:
        return True

    def record(self, gather: Gather) -> Any:
        self.launches += 1
        return _FakeEvent(self.delay * (1 + self.launches % 3), gather.stager)


class _PipelinedWorker(Worker):
    overwritten = 0
    overlapped = 0

    def __init__(self, spec: WorkerSpec, sock: zmq.Socket[Any]) -> None:
        super().__init__(spec, sock)
        self.launcher = _PipelinedLauncher(spec.wid, spec.max_batch)

    def completed(self, launched: Launched) -> bool:
        done = super().completed(launched)
        if done and not launched.event.intact():  # the "device" read it until now
            self.overwritten += 1
        return done

    def finish(self, launched: Launched) -> None:
        if any(g.requests for g in self.gathers if g.stager is not launched.event.stager):
            self.overlapped += 1  # requests were taken while this batch "ran"
        super().finish(launched)


class _Harness:
    """A worker serving on a thread behind an inproc ROUTER socket; with ``lane``, also a
    lane (a socketpair: ``lane_end`` plays the router's end)."""

    def __init__(
        self,
        on_arrival: bool,
        max_batch: int = 16,
        max_delay_ms: float = 1.0,
        lane: bool = False,
        start: bool = True,
    ) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind("inproc://backend")
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"w")
        dealer.connect("inproc://backend")
        spec = WorkerSpec(
            wid="w",
            backend="inproc://backend",
            model="affine",
            path="",
            version="1",
            device="cpu",
            generation=1,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            heartbeat_interval_s=0.05,
        )
        self.worker = _PipelinedWorker(spec, dealer)
        self.worker.model = LoadedModel(_Affine(), CPU, "safetensors", 1)
        # Small arenas: some requests overflow. On arrival, copies run on the copier's threads.
        self.worker.prepare_staging([[torch.zeros(1, 64)]], on_arrival=on_arrival)
        self.lane_end: socket.socket | None = None
        if lane:
            ours, self.lane_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            self.worker.lane = Lane(ours)
        self.batches: dict[int, int] = {}
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        if start:
            self.thread.start()

    def _serve(self) -> None:
        try:
            self.worker.serve()
        except BaseException as exc:
            self.failure.append(exc)

    def send(self, key: int, x: torch.Tensor, lane: bool = False) -> None:
        header = {
            "model": "affine",
            "id": f"id-{key}",
            "inputs": [{"dtype": WIRE_DTYPES[x.dtype], "shape": list(x.shape)}],
        }
        raw = x.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        frames = [b"R", struct.pack("<Q", key), msgpack.packb(header), raw]
        if lane:
            assert self.lane_end is not None
            self.lane_end.sendmsg(lane_pack(frames)[0])
        else:
            self.router.send_multipart([b"w", *frames])

    def receive_lane(self) -> tuple[int, bytes, dict[str, Any], list[torch.Tensor]]:
        """The next reply down the lane: (key, status, header, outputs)."""
        assert self.lane_end is not None
        self.lane_end.settimeout(10)
        frames = [f.bytes for f in lane_unpack(self.lane_end.recv(1 << 17))]
        return self._parse([b"w", *frames])

    def receive(self) -> tuple[int, bytes, dict[str, Any], list[torch.Tensor]]:
        """The next reply: (key, status, header, outputs); heartbeats are tallied."""
        while True:
            if not self.router.poll(10_000):
                raise AssertionError(f"no reply within 10 s; worker failure: {self.failure}")
            frames = self.router.recv_multipart()
            if frames[1] == b"E":
                event = msgpack.unpackb(frames[2], raw=False)
                for size, n in event.get("batches", []):
                    self.batches[size] = self.batches.get(size, 0) + n
                continue
            return self._parse(frames)

    @staticmethod
    def _parse(frames: list[bytes]) -> tuple[int, bytes, dict[str, Any], list[torch.Tensor]]:
        (key,) = struct.unpack("<Q", frames[2])
        header = msgpack.unpackb(frames[4], raw=False)
        outputs, more = [], iter(frames[5:])
        for entry in header.get("outputs", []):
            data = entry.get("data")
            raw = bytearray(next(more) if data is None else data)
            dtype = TORCH_DTYPES[entry["dtype"]]
            t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            outputs.append(t.reshape(entry["shape"]))
        return key, frames[3], header, outputs

    def stop(self) -> None:
        self.router.send_multipart([b"w", b"C", msgpack.packb({"t": "stop"})])
        self.thread.join(10)
        assert not self.thread.is_alive() and not self.failure, self.failure
        assert self.worker.overwritten == 0, "a gather's arena changed while its batch ran"

    def close(self) -> None:
        self.worker.sock.close(linger=0)
        self.router.close(linger=0)
        self.ctx.term()
        if self.lane_end is not None:
            self.lane_end.close()


def _mixed(i: int, gen: torch.Generator) -> torch.Tensor:
    """Request ``i``: one of several dtypes and shapes, 0 to 3 rows (or a scalar)."""
    rows = int(torch.randint(0, 4, (), generator=gen))
    kind = i % 7
    if kind == 0:
        return torch.randn(rows, 4, generator=gen).abs()
    if kind == 1:
        return torch.randn(rows, 3, 5, generator=gen).abs().half()
    if kind == 2:
        return torch.randint(0, 100, (rows, 7), generator=gen)
    if kind == 3:
        return torch.randn(rows, generator=gen).abs().double()
    if kind == 4:
        return torch.randn(rows, 2, generator=gen).abs().bfloat16()
    if kind == 5:
        return torch.tensor(float(i))  # no batch dimension: runs alone
    return torch.randint(0, 255, (rows, 8192), generator=gen, dtype=torch.uint8)  # 8 KiB a row


@pytest.fixture(params=[True, False], ids=["staged-on-arrival", "staged-at-launch"])
def harness(request: pytest.FixtureRequest) -> Iterator[_Harness]:
    h = _Harness(on_arrival=request.param)
    try:
        yield h
    finally:
        h.close()


def test_pipelined_answers_equal_unbatched_per_request(harness: _Harness) -> None:
    gen = torch.Generator().manual_seed(5)
    total, in_flight = 600, 40
    sent: dict[int, torch.Tensor] = {}
    for key in range(in_flight):
        sent[key] = _mixed(key, gen)
        harness.send(key, sent[key])
    answered = 0
    while answered < total:
        key, status, header, outputs = harness.receive()
        x = sent.pop(key)
        assert status == b"OK", header
        assert header["id"] == f"id-{key}" and header["version"] == "1"
        (got,) = outputs
        want = _Affine()(x)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        answered += 1
        nxt = answered + in_flight - 1
        if nxt < total:
            sent[nxt] = _mixed(nxt, gen)
            harness.send(nxt, sent[nxt])
    assert not sent
    harness.stop()
    assert max(harness.batches) > 4  # batches did form while the previous one "ran"
    assert harness.worker.overlapped > 10
    # Some batches were queued behind a running one, and no arena changed under them.
    assert harness.worker.queued_launches > 5
    assert sum(size * n for size, n in harness.batches.items()) >= total - 100


def test_a_failing_request_mid_pipeline_fails_alone(harness: _Harness) -> None:
    gen = torch.Generator().manual_seed(6)
    bad = {13, 50, 51, 97}
    total = 160
    sent = {}
    for key in range(total):  # a burst: several launches, some while others "run"
        x = torch.randn(1 + key % 2, 4, generator=gen).abs()
        sent[key] = -x if key in bad else x
        harness.send(key, sent[key])
    for _ in range(total):
        key, status, header, outputs = harness.receive()
        if key in bad:
            assert status == b"MODEL_ERROR" and header["error"]["code"] == "MODEL_ERROR"
            assert "negative input" in header["error"]["message"] and header["id"] == f"id-{key}"
        else:
            assert status == b"OK" and torch.equal(outputs[0], sent[key] * 2 + 1)
        del sent[key]
    # The worker goes on batching afterwards.
    harness.send(1000, torch.ones(2, 4))
    key, status, _, outputs = harness.receive()
    assert (key, status) == (1000, b"OK") and torch.equal(outputs[0], torch.full((2, 4), 3.0))
    harness.stop()


def test_stop_answers_every_request_taken(harness: _Harness) -> None:
    for key in range(48):
        harness.send(key, torch.full((1, 4), float(key)))
    harness.router.send_multipart([b"w", b"C", msgpack.packb({"t": "stop"})])
    keys = set()
    for _ in range(48):
        key, status, _, outputs = harness.receive()
        assert status == b"OK" and torch.equal(outputs[0], torch.full((1, 4), 2.0 * key + 1))
        keys.add(key)
    assert keys == set(range(48))
    harness.stop()


@pytest.mark.parametrize("on_arrival", [True, False], ids=["staged-on-arrival", "staged-at-launch"])
def test_lane_requests_are_answered_down_the_lane(on_arrival: bool) -> None:
    h = _Harness(on_arrival=on_arrival, lane=True)
    try:
        for key in range(60):  # both ways at once, batched together
            h.send(key, torch.full((1 + key % 3, 4), float(key)), lane=key % 2 == 0)
        for _ in range(30):
            key, status, _, outputs = h.receive_lane()
            assert key % 2 == 0 and status == b"OK"
            assert torch.equal(outputs[0], torch.full((1 + key % 3, 4), 2.0 * key + 1))
        odd = {h.receive()[0] for _ in range(30)}
        assert odd == set(range(1, 60, 2))
        assert not h.worker.replies.lane_keys  # every lane request was answered
        h.stop()
    finally:
        h.close()


def test_stop_answers_what_is_still_in_the_lane() -> None:
    """The stop comes on the backend socket, requests on the lane: the two ways are not
    ordered, so a stop may be read while requests sent before it wait in the lane."""
    h = _Harness(on_arrival=False, lane=True, start=False)
    try:
        for key in range(40):
            h.send(key, torch.full((1, 4), float(key)), lane=True)
        h.worker.stopping = True  # as if the stop had been read first
        h.thread.start()
        got = {h.receive_lane()[0] for _ in range(40)}
        assert got == set(range(40))
        h.thread.join(10)
        assert not h.thread.is_alive() and not h.failure, h.failure
    finally:
        h.close()


# ---------------------------------------------------------------- through a real pool


@pytest.mark.slow
@pytest.mark.parametrize("on_arrival", ["1", "0"], ids=["staged-on-arrival", "staged-at-launch"])
def test_pool_batches_concurrent_clients_per_request(tmp_path: Path, on_arrival: str) -> None:
    """One worker, 12 client threads with mixed row counts and ids, a poisoned client:
    every answer is the one its request gets alone, matched by id."""
    d = str(tmp_path)
    mlp = make_factory_model(os.path.join(d, "mlp"), 7, forward="raise_if_negative")
    pair = make_two_input(os.path.join(d, "pair", "v1.pt"))
    models = [
        {
            "name": "mlp",
            "path": mlp,
            "version": "7",
            "devices": ["cpu"],
            "max_batch": 8,
            "max_delay_ms": 3.0,
        },
        {
            "name": "pair",
            "path": pair,
            "version": "1",
            "devices": ["cpu"],
            "max_batch": 8,
            "max_delay_ms": 3.0,
        },
    ]
    errors: list[str] = []

    def client(idx: int) -> None:
        with Client(pool.frontend, retries=1, timeout=30) as c:
            for i in range(60):
                rid = f"{idx}-{i}"
                try:
                    if idx % 3 == 2:
                        a = np.full((1 + i % 3, 4), i, np.float32)
                        b = np.full((1 + i % 3, 4), idx, np.float32)
                        r = c.infer("pair", a, b, id=rid)
                        ok = np.array_equal(r.outputs[0], a + b) and np.array_equal(
                            r.outputs[1], a * b
                        )
                    else:
                        x = mlp_input(1 + (i + idx) % 3, seed=idx * 1000 + i)
                        poisoned = idx == 0 and i % 10 == 5
                        if poisoned:
                            x = -np.abs(x) - 1
                        try:
                            r = c.infer("mlp", x, id=rid)
                        except ModelError as exc:
                            ok = poisoned and "negative input" in str(exc)
                            if not ok:
                                errors.append(f"{rid}: {exc}")
                            continue
                        ok = not poisoned and np.allclose(
                            r.outputs[0], mlp_reference(7, x), rtol=1e-5, atol=1e-6
                        )
                    if not ok or r.id != rid:
                        errors.append(f"{rid}: wrong answer {r}")
                except Exception as exc:
                    errors.append(f"{rid}: {type(exc).__name__}: {exc}")

    env = {"GPU_POOL_STAGE_ON_ARRIVAL": on_arrival}
    with running_pool(d, models, env_extra=env) as pool:
        in_threads(client, 12, timeout=120)
        assert not errors, errors[:5]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fresh", "via-spawner"])
def test_worker_host_bench_runs(tmp_path: Path, how: str) -> None:
    """scripts/bench_worker_host.py (one worker over its DEALER protocol) on the CPU, in
    a fresh process or forked from workers.spawner as poold starts it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable,
        os.path.join(root, "scripts", "bench_worker_host.py"),
        "--json",
        "--seconds",
        "1",
        "--warmup-s",
        "0.5",
        "--inflight",
        "8",
        "--max-batch",
        "8",
        "--reference",
        "--reference-s",
        "0.3",
        *(["--via-spawner"] if how == "via-spawner" else []),
    ]
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0 and result["requests"] > 0
    assert result["worker_main_thread_us"] > 0 and result["reference"]["images_per_s"] > 0
    if how == "via-spawner":
        assert result["via_spawner"] and result["worker_pid"] != result["spawner_pid"]
        with pytest.raises(ProcessLookupError):  # the bench stopped its spawner
            os.kill(result["spawner_pid"], 0)


# ------------------------------------------------- CUDA graph replay, simulated on a CPU


class _FakeGraph:
    """Stands in for a captured ``torch.cuda.CUDAGraph``: replay runs the model on the
    fixed input tensors into the fixed output tensors, as a real replay does."""

    def __init__(
        self,
        inputs: list[torch.Tensor],
        outputs: list[torch.Tensor],
        module: torch.nn.Module | None = None,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.module = module or _Affine()
        self.replays = 0
        self.fail = False

    def replay(self) -> None:
        if self.fail:
            raise RuntimeError("replay refused")
        self.replays += 1
        self.outputs[0].copy_(self.module(self.inputs[0]))


def _fake_table(
    key_example: torch.Tensor,
    sizes: list[int],
    exact: bool = False,
    module: torch.nn.Module | None = None,
) -> tuple[GraphTable, list[_FakeGraph]]:
    table, graphs, forwards = GraphTable(), [], []
    for rows in sizes:
        # Stale, distinctive padding: rows past a batch's own must never reach an answer.
        inp = torch.full((rows, *key_example.shape[1:]), 1e6, dtype=key_example.dtype)
        out = torch.full_like(module(inp) if module else inp, -7.0)
        graph = _FakeGraph([inp], [out], module)
        graphs.append(graph)
        forwards.append(CapturedForward(rows, graph, [inp], [out], exact))  # type: ignore[arg-type]
    key = batch_key([key_example])
    assert key is not None
    table.add(key, forwards)
    return table, graphs


def test_graph_replays_answer_like_unbatched_requests(harness: _Harness) -> None:
    """Batches of float32 [N, 4] go through the (simulated) graphs, padded up to the next
    captured size; everything else through the ordinary forward; all answers equal the
    request run alone."""
    table, graphs = _fake_table(torch.zeros(1, 4), [1, 2, 4, 8, 16])
    harness.worker.launcher.graphs = table
    gen = torch.Generator().manual_seed(11)
    total, in_flight = 400, 30
    sent: dict[int, torch.Tensor] = {}

    def request(i: int) -> torch.Tensor:
        return torch.randn(1 + i % 3, 4, generator=gen).abs() if i % 2 else _mixed(i, gen)

    for key in range(in_flight):
        sent[key] = request(key)
        harness.send(key, sent[key])
    for answered in range(1, total + 1):
        key, status, header, outputs = harness.receive()
        x = sent.pop(key)
        assert status == b"OK", header
        want = _Affine()(x)
        assert outputs[0].shape == want.shape and torch.equal(outputs[0], want), key
        nxt = answered + in_flight - 1
        if nxt < total:
            sent[nxt] = request(nxt)
            harness.send(nxt, sent[nxt])
    harness.stop()
    assert sum(g.replays for g in graphs) > 20
    assert sum(g.replays for g in graphs[2:]) > 0  # padded, multi-request batches too


class _RowSum(torch.nn.Module):
    """Cannot be batched: its 0-d output sums all the rows it is given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2 + 1).sum()


def test_graphs_of_a_model_that_cannot_batch_replay_one_request_of_their_shape(
    harness: _Harness,
) -> None:
    """Unbatchable (the contract's word): every request runs alone, a request of the
    captured shape through its graph, its 0-d output answered whole, any other shape
    through the ordinary forward; each answer is that request's own."""
    module = _RowSum()
    harness.worker.model = LoadedModel(module, CPU, "safetensors", 1)
    # Captured at two rows: a one-row request padded into it would sum the stale row.
    table, graphs = _fake_table(torch.zeros(1, 4), [2], exact=True, module=module)
    harness.worker.launcher.graphs = table
    harness.worker.launcher.batchable = False
    sent = {key: torch.full((1 + key % 2, 4), float(key)) for key in range(40)}
    for key, x in sent.items():
        harness.send(key, x)
    for _ in sent:
        key, status, header, outputs = harness.receive()
        assert status == b"OK", header
        assert outputs[0].shape == () and float(outputs[0]) == float(module(sent[key])), key
    harness.stop()
    assert graphs[0].replays == 20  # the two-row requests, one replay each


def test_a_failing_replay_falls_back_to_the_ordinary_forward(harness: _Harness) -> None:
    table, graphs = _fake_table(torch.zeros(1, 4), [4, 16])
    for g in graphs:
        g.fail = True
    harness.worker.launcher.graphs = table
    for key in range(20):
        harness.send(key, torch.full((1, 4), float(key)))
    for _ in range(20):
        key, status, _, outputs = harness.receive()
        assert status == b"OK" and torch.equal(outputs[0], torch.full((1, 4), 2.0 * key + 1))
    harness.stop()
