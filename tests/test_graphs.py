"""CUDA graphs of the forward (workers/graphs.py): the batch-size ladder, the lookup, the
``cuda_graphs`` setting, and on a GPU: replays that answer like the model, padding
included, and models that cannot be captured keeping the ordinary path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import in_threads, running_pool

from pool.config import ConfigError, load_config
from workers.batching import batch_key
from workers.graphs import (
    CapturedForward,
    GraphTable,
    batch_ladder,
    capture_graphs,
    capture_plan,
    capture_sizes,
)
from workers.loader import LoadedModel, load_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("max_batch", "ladder"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (32, list(range(1, 33))),
        (42, [*range(1, 33), 36, 40, 42]),
        (64, [*range(1, 33), *range(36, 65, 4)]),
        (128, [*range(1, 33), *range(36, 65, 4), 80, 96, 112, 128]),
        (0, [1]),
    ],
)
def test_batch_ladder(max_batch: int, ladder: list[int]) -> None:
    assert batch_ladder(max_batch) == ladder


def test_lookup_takes_the_smallest_graph_with_room() -> None:
    key = batch_key([torch.zeros(1, 4)])
    assert key is not None
    table = GraphTable()
    table.add(key, [CapturedForward(n, None, [], []) for n in (8, 1, 4)])  # type: ignore[arg-type]
    assert [table.find(key, n).rows for n in (1, 2, 3, 4, 5, 8)] == [1, 4, 4, 4, 8, 8]  # type: ignore[union-attr]
    assert table.find(key, 9) is None
    assert table.find(batch_key([torch.zeros(1, 5)]), 1) is None
    assert table.find(None, 1) is None
    assert len(table) == 3 and table.describe() == {"signatures": 1, "sizes": [1, 4, 8]}


def test_capture_follows_the_batching_contract() -> None:
    """A batchable model is captured at the whole ladder once per signature; one that
    cannot batch only at the rows of each example it was warmed up on (a batch of 8 of
    a one-row-only model fails: issue 15's matrix on an H200)."""
    assert capture_sizes(True, 8, 1) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert capture_sizes(False, 8, 1) == [1]
    assert capture_sizes(False, 8, 3) == [3]
    examples = [
        [torch.zeros(1, 6)],
        [torch.zeros(8, 6)],  # the same signature at another batch size
        [torch.zeros(2, 6)],
        [torch.zeros(1, 7)],  # another signature
        [torch.zeros(())],  # no batch dimension: never captured
        [torch.zeros(2, 6), torch.zeros(3, 6)],  # first dims differ: no batch either
    ]
    k6, k7 = batch_key([torch.zeros(1, 6)]), batch_key([torch.zeros(1, 7)])
    assert capture_plan(examples, True, 4) == [(0, k6, [1, 2, 3, 4]), (3, k7, [1, 2, 3, 4])]
    single = capture_plan(examples, False, 4)
    assert single == [(0, k6, [1]), (1, k6, [8]), (2, k6, [2]), (3, k7, [1])]
    assert capture_plan([[torch.zeros(())]], False, 4) == []


def test_lookup_of_a_model_that_cannot_batch_is_exact() -> None:
    """Its graphs replay only a request of their own rows (never padded: its rows are
    not independent), and each row count added later joins the signature's list."""
    key = batch_key([torch.zeros(1, 4)])
    assert key is not None
    table = GraphTable()
    table.add(key, [CapturedForward(1, None, [], [], exact=True)])  # type: ignore[arg-type]
    table.add(key, [CapturedForward(4, None, [], [], exact=True)])  # type: ignore[arg-type]
    found = {n: table.find(key, n) for n in range(1, 6)}
    assert {n: g.rows for n, g in found.items() if g is not None} == {1: 1, 4: 4}
    assert table.describe() == {"signatures": 1, "sizes": [1, 4]}


def test_no_graphs_off_a_gpu(tmp_path: Path) -> None:
    model = load_model(make_mlp(str(tmp_path / "m.pt"), seed=1), "cpu")
    table, problems = capture_graphs(model, [[torch.zeros(2, 16)]], 8)
    assert len(table) == 0 and problems == ["not on a CUDA device"]


def _config(tmp_path: Path, value: str) -> Path:
    model = make_mlp(str(tmp_path / "m.pt"), seed=1)
    path = tmp_path / "pool.toml"
    path.write_text(f'[[models]]\nname = "m"\npath = "{model}"\ncuda_graphs = {value}\n')
    return path


def test_cuda_graphs_setting(tmp_path: Path) -> None:
    assert load_config(str(_config(tmp_path, "true"))).models[0].cuda_graphs is True
    with pytest.raises(ConfigError) as err:
        load_config(str(_config(tmp_path, '"yes"')))
    assert any("cuda_graphs" in p and "true or false" in p for p in err.value.problems)


# ------------------------------------------------------------------------------ on a GPU


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 64)
        self.b = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.a(x))
        return self.b(h), h.sum(1)


class _Synchronising(torch.nn.Module):
    """Branches on a value: a host sync, which a capture refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return x * 2
        return x


class _OneRow(torch.nn.Module):
    """Cannot be batched: refuses any batch but one row, and sums it to a 0-d output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) != 1:
            raise RuntimeError("one row at a time")
        return (x * 3).sum()


class _Rowless(torch.nn.Module):
    """Sums over the batch: its output cannot be cut back per request."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0, keepdim=True)


def _on_gpu(module: torch.nn.Module) -> LoadedModel:
    dev = torch.device("cuda", 0)
    scripted = torch.jit.script(module.eval()).to(dev)
    return LoadedModel(scripted, dev, "torchscript", 1)


@pytest.mark.gpu
@needs_cuda
def test_replays_equal_the_model_at_every_row_count() -> None:
    torch.manual_seed(0)
    model = _on_gpu(_Mlp())
    example = torch.randn(1, 16, device=model.device)
    table, problems = capture_graphs(model, [[example]], 44)
    assert problems == [] and table.describe()["sizes"] == [*range(1, 33), 36, 40, 44]
    key = batch_key([example])
    gen = torch.Generator().manual_seed(1)
    # Padded sizes (33 runs the graph of 36...), and sizes revisited: whatever an earlier
    # batch left in the rows past a batch's own must never reach its answers.
    for rows in (*range(1, 45), 33, 3, 43, 37, 1, 44, 34):
        x = torch.randn(rows, 16, generator=gen)
        graph = table.find(key, rows)
        assert graph is not None and graph.rows >= rows
        got = [o.cpu() for o in graph.run([x.pin_memory()], rows)]
        want = [o.cpu() for o in model.forward([x.to(model.device)])]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_models_that_cannot_be_captured_keep_the_ordinary_path() -> None:
    for module, why in ((_Synchronising(), "capture at"), (_Rowless(), "rows first")):
        model = _on_gpu(module)
        x = torch.ones(2, 4, device=model.device)
        table, problems = capture_graphs(model, [[x]], 8)
        assert len(table) == 0 and len(problems) == 1 and why in problems[0], problems
        # The device is still usable afterwards, random ops too (a capture that failed
        # inside torch.cuda.graph left its stream current, and torch.rand then raised).
        assert torch.equal(model.forward([x])[0].cpu(), module(x.cpu()))
        assert torch.rand(3, device=model.device).shape == (3,)
        assert not torch.cuda.is_current_stream_capturing()


@pytest.mark.gpu
@needs_cuda
def test_a_model_that_cannot_batch_is_captured_at_its_own_shape_only() -> None:
    model = _on_gpu(_OneRow())
    x = torch.rand(1, 6, device=model.device)
    table, problems = capture_graphs(model, [[x]], 8, batchable=False)
    assert problems == [] and table.describe()["sizes"] == [1], problems
    key = batch_key([x])
    graph = table.find(key, 1)
    assert graph is not None and graph.exact and table.find(key, 2) is None
    y = torch.rand(1, 6)
    got = graph.run([y.pin_memory()], 1)
    assert len(got) == 1 and got[0].dim() == 0
    torch.testing.assert_close(got[0].cpu(), (y * 3).sum())
    # Told it batches, the capture at 8 rows fails: reported, never raised.
    table, problems = capture_graphs(model, [[x]], 8, batchable=True)
    assert len(table) == 0 and "fails at 8 rows" in problems[0], problems


@pytest.mark.gpu
@needs_cuda
def test_pool_with_cuda_graphs_answers_every_client_like_the_cpu(tmp_path: Path) -> None:
    d = str(tmp_path)
    path = make_mlp(os.path.join(d, "m", "m.pt"), seed=3, warmup_batch_sizes=(1, 16))
    model = {
        "name": "m",
        "path": path,
        "devices": ["cuda:0"],
        "max_batch": 16,
        "max_delay_ms": 2.0,
        "cuda_graphs": True,
    }
    errors: list[str] = []
    with running_pool(d, [model]) as pool:
        assert "CUDA graphs at batch sizes 1-16, 16 of them" in pool.log()

        def client(idx: int) -> None:
            with pool.client(timeout=30) as c:
                for i in range(80):
                    x = mlp_input(1 + (i + idx) % 3, seed=idx * 1000 + i)
                    out = c.infer("m", x).outputs[0]
                    if not np.allclose(out, mlp_reference(3, x), rtol=1e-3, atol=1e-4):
                        errors.append(f"client {idx} request {i}: wrong answer")

        in_threads(client, 12, timeout=120)
    assert not errors, errors[:5]
