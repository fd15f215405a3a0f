"""workers.schema: what a model file says about its inputs before any request."""

from __future__ import annotations

import os

import pytest
import torch

from workers.loader import load_model
from workers.probe import contract_of
from workers.schema import carried_examples, forward_schema, warmup_sets
from workers.warmup import warm_up


class _Pair(torch.nn.Module):
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x1 + x2, x1 * x2


def _script(tmp: str, module: torch.nn.Module) -> str:
    path = os.path.join(tmp, "m.pt")
    torch.jit.script(module).save(path)
    return path


@pytest.mark.slow
def test_torchscript_example_inputs_attribute_makes_a_probed_contract(tmp_path: object) -> None:
    module = _Pair()
    module.example_inputs = [  # a list of sets: two batch sizes
        (torch.ones(1, 3, 16, 16), torch.ones(1, 3, 16, 16)),
        (torch.ones(4, 3, 16, 16), torch.ones(4, 3, 16, 16)),
    ]
    model = load_model(_script(str(tmp_path), module), "cpu")
    sets, source = warmup_sets(model, None, [], "cpu")
    assert source == "example_inputs" and [list(s[0].shape) for s in sets] == [
        [1, 3, 16, 16],
        [4, 3, 16, 16],
    ]
    seen: list[list[torch.Tensor]] = []
    warm_up(model, sets, seen)
    contract = contract_of(model, None, sets, seen, source)
    assert contract is not None and contract.batchable
    assert [str(t) for t in contract.inputs] == [
        "x1: float32[N, 3, 16, 16]",
        "x2: float32[N, 3, 16, 16]",
    ]
    assert str(forward_schema(model)) == "forward(x1: Tensor, x2: Tensor) -> Tuple[Tensor, Tensor]"


@pytest.mark.slow
def test_a_module_without_examples_has_a_schema_but_no_sets(tmp_path: object) -> None:
    model = load_model(_script(str(tmp_path), _Pair()), "cpu")
    assert carried_examples(model) == []
    assert warmup_sets(model, None, [], "cpu") == ([], "example_inputs")
    schema = forward_schema(model)
    assert schema is not None and [n for n, _ in schema.inputs] == ["x1", "x2"]


@pytest.mark.slow
def test_torch_export_program_gives_dtypes_shapes_and_an_example(tmp_path: object) -> None:
    batch = torch.export.Dim("batch", max=64)
    example = (torch.ones(2, 3, 16, 16), torch.ones(2, 3, 16, 16, dtype=torch.float64))
    program = torch.export.export(_Pair(), example, dynamic_shapes=({0: batch}, {0: batch}))
    path = os.path.join(str(tmp_path), "m.pt2")
    torch.export.save(program, path)
    model = load_model(path, "cpu")
    sets = carried_examples(model)
    assert [(s.dtype, list(s.shape)) for s in sets[0]] == [
        (torch.float32, [2, 3, 16, 16]),
        (torch.float64, [2, 3, 16, 16]),
    ]
    schema = forward_schema(model)
    assert schema is not None and [n for n, _ in schema.inputs] == ["x1", "x2"]
    types = [t for _, t in schema.inputs]
    assert types[0].startswith("float32[s") and types[1].startswith("float64[s"), types
    assert types[0].endswith(", 3, 16, 16]")
