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
from workers.graphs import CapturedForward, GraphTable, batch_ladder, capture_graphs
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
        # The device is still usable afterwards.
        assert torch.equal(model.forward([x])[0].cpu(), module(x.cpu()))


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
