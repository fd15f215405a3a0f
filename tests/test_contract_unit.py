"""The contract's decisions without a daemon: records, differences, probing, labels."""

from __future__ import annotations

import pytest
import torch

from pool.contract import Contract, ContractError, InputSignature, TensorSpec, differences
from pool.labels import label_conflict, label_problem
from pool.state import Deployed, ModelState
from pool.watch import _verdict
from workers.loader import LoadedModel
from workers.probe import ProbeError, probe_contract
from workers.warmup import example_inputs, warm_up

CPU = torch.device("cpu")


def spec(name: str, dtype: str, *shape: int, batched: bool = True) -> TensorSpec:
    return TensorSpec(name, dtype, shape, 0 if batched else None)


BASE = Contract((spec("x", "float32", -1, 16),), (spec("output0", "float32", -1, 4),), True)


@pytest.mark.parametrize(
    ("new", "words"),
    [
        (Contract((spec("ids", "int64", -1, 16),), BASE.outputs, True), "dtype int64 in the new"),
        (Contract(BASE.inputs * 2, BASE.outputs, True), "inputs: the new version has 2"),
        (Contract(BASE.inputs, (spec("o", "float32", -1, 4, 2),), True), "rank 3 in the new"),
        (Contract(BASE.inputs, (spec("o", "float32", -1, 8),), True), "dimension 1 is 8"),
        (
            Contract(BASE.inputs, (spec("o", "float32", 1, 4, batched=False),), False),
            "does not follow the batch in the new version",
        ),
        (Contract(BASE.inputs, (spec("o", "float16", -1, 4),), True), "dtype float16"),
    ],
)
def test_differences_name_what_changed(new: Contract, words: str) -> None:
    found = differences(BASE, new)
    assert found and any(words in line for line in found), found


def test_same_or_more_dynamic_contract_is_kept() -> None:
    assert differences(BASE, BASE) == []
    looser = Contract((spec("x", "float32", -1, -1),), BASE.outputs, True)
    assert differences(BASE, looser) == []


def test_contract_json_round_trip_and_junk() -> None:
    c = Contract(BASE.inputs, BASE.outputs, True, (InputSignature.of([("float32", (2, 16))]),))
    assert Contract.from_json(c.to_json()) == c
    for junk in (None, {"batchable": 1}, {"batchable": True, "inputs": [{"name": 1}]}):
        with pytest.raises(ContractError):
            Contract.from_json(junk)


class _Net(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "scalar":
            return x.sum()
        if self.mode == "one_row":
            return x.sum(0, keepdim=True)
        if self.mode == "fixed" and x.shape[0] != 1:
            raise RuntimeError("one row only")
        if self.mode == "complex":
            return torch.complex(x, x)
        return x * 2


def probe(mode: str, *shapes: tuple[int, ...]) -> Contract | None:
    model = LoadedModel(_Net(mode), CPU, "torchscript", 1, input_names=("x",))
    sigs = [InputSignature.of([("float32", s)]) for s in shapes]
    sets = example_inputs(None, sigs, CPU)
    seen: list[list[torch.Tensor]] = []
    warm_up(model, sets, seen)
    return probe_contract(model, sets, seen, input_names=model.input_names)


def test_probe_finds_batching_and_dynamic_dims() -> None:
    c = probe("double", (1, 3, 4), (2, 5, 4))
    assert c is not None and c.batchable
    assert c.inputs == (spec("x", "float32", -1, -1, 4),)
    assert c.outputs == (spec("output0", "float32", -1, -1, 4),)
    assert probe("double") is None  # nothing to probe with


@pytest.mark.parametrize("mode", ["scalar", "one_row", "fixed"])
def test_probe_marks_what_cannot_be_batched(mode: str) -> None:
    c = probe(mode, (1, 4))
    assert c is not None and not c.batchable
    assert c.inputs[0].batch_dim is None and c.outputs[0].batch_dim is None


def test_probe_refuses_outputs_the_wire_cannot_carry() -> None:
    with pytest.raises(ProbeError, match="complex64"):
        probe("complex", (1, 4))


def test_labels() -> None:
    assert label_problem("2") is None and label_problem("v1.2+cu121") is None
    assert label_problem("a b/c") and label_problem("") and label_problem("x" * 129)
    state = ModelState("m", current=Deployed("2", "/m/b.pt", "sha256:bb"))
    state.history.append(
        {"outcome": "committed", "version": "1", "path": "/m/a.pt", "digest": "sha256:aa"}
    )
    assert label_conflict(state, "1", "sha256:aa") is None  # the same file again
    assert "already names another file" in str(label_conflict(state, "1", "sha256:cc"))
    assert label_conflict(state, "2", "sha256:cc")
    assert label_conflict(state, "3", "sha256:cc") is None


def test_watch_verdict() -> None:
    assert _verdict(5, 5, 0.0) and _verdict(10, 6, 0.05)
    assert not _verdict(4, 4, 0.0)  # too few to judge
    assert not _verdict(100, 60, 0.3)  # not far above the old version's rate


def test_describe_lines_for_people() -> None:
    from pool.ctl.describe import describe_lines

    data = {
        "name": "pair",
        "version": "2",
        "devices": ["cpu"],
        "contract_known": True,
        "contract_source": "traffic",
        "inputs": [{"name": "x1", "dtype": "float32", "shape": [-1, 3, -1], "batch_dim": 0}],
        "outputs": [{"name": "output0", "dtype": "float32", "shape": [], "batch_dim": None}],
        "batching": {"batchable": False, "max_batch": 1, "max_delay_ms": 2.0},
        "versions": [{"version": "2", "digest": "sha256:ab", "serving": True, "inputs": []}],
    }
    text = "\n".join(describe_lines(data))
    assert "x1: float32[N, 3, ?]" in text and "output0: float32[]" in text
    assert "batching: off" in text and "* 2" in text
    assert "not checked (no example inputs)" in "\n".join(
        describe_lines({**data, "contract_known": False})
    )


def test_manifest_names_the_inputs_and_outputs() -> None:
    from workers.manifest import InputSpec, Manifest
    from workers.probe import contract_of

    model = LoadedModel(_Net("double"), CPU, "torchscript", 1, input_names=("x",))
    manifest = Manifest(
        "m.toml", inputs=(InputSpec("float32", (1, 4), name="pixels"),), output_names=("logits",)
    )
    sets = example_inputs(manifest, None, CPU)
    seen: list[list[torch.Tensor]] = []
    warm_up(model, sets, seen)
    c = contract_of(model, manifest, sets, seen, "manifest")
    assert c is not None and c.source == "manifest"
    assert [t.name for t in c.inputs] == ["pixels"] and [t.name for t in c.outputs] == ["logits"]
    plain = contract_of(model, None, sets, seen, "probe")
    assert plain is not None and [t.name for t in plain.inputs] == ["x"]


class _FixedLength(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise RuntimeError("length 3 only")
        return x * 2


def test_manifest_version_also_tries_the_served_shapes() -> None:
    """A new version with a manifest of one sequence length is tried on the lengths the
    serving version is sent; one it refuses narrows its contract, and the check says so."""
    from workers.manifest import InputSpec, Manifest
    from workers.probe import contract_of
    from workers.warmup import served_sets

    model = LoadedModel(_FixedLength(), CPU, "torchscript", 1, input_names=("x",))
    manifest = Manifest("m.toml", inputs=(InputSpec("float32", (1, 3, 4)),))
    served = [InputSignature.of([("float32", (1, n, 4))]) for n in (3, 5)]
    served.append(InputSignature.of([("int64", (1, 5, 4))]))  # other dtype: not tried
    sets = example_inputs(manifest, served, CPU)
    seen: list[list[torch.Tensor]] = []
    warm_up(model, sets, seen)
    extra = served_sets(model, manifest, served, CPU, seen)
    assert [tuple(s[0].shape) for s in extra] == [(1, 3, 4)]  # length 5 was refused
    new = contract_of(model, manifest, sets + extra, seen, "manifest")
    old = Contract((spec("x", "float32", -1, -1, 4),), (spec("o", "float32", -1, -1, 4),), True)
    assert new is not None and new.inputs[0].shape == (-1, 3, 4)
    found = differences(old, new)
    assert any("dimension 1 takes only 3 in the new version, any size serving" in f for f in found)
