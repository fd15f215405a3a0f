"""workers.batching: batch keys, batch planning, and batched answers that equal the
unbatched ones request by request."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from modelkit import make_factory_model, make_mlp, make_two_input, mlp_input, mlp_reference

from workers.batching import batch_key, plan_batches, run_batch
from workers.loader import LoadedModel, ModelOutputError, load_model

CPU = torch.device("cpu")


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
