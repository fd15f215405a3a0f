"""The model contract: what a version takes and what it returns, as typed records.

Imports the standard library only, so the supervisor (no torch, no numpy) and the
workers share one definition and one wire form.

Two kinds of record:

- ``InputSignature``: the dtype and concrete shape of every positional input of one
  request (what a client actually sent). Warm-up runs on these. On the wire it is a map
  ``{"inputs": [{"dtype": "float32", "shape": [1, 16]}, ...]}``, never a bare list of
  pairs: a list of signatures and a signature of pairs would look alike (a model with
  two inputs was once misread that way).
- ``Contract``: per version, each input and output as a ``TensorSpec`` (name, dtype,
  shape with ``-1`` for a dynamic dimension, batch dim), whether the model can be
  batched, and the concrete ``examples`` it was probed with (warm-up inputs for the next
  version, also after a restart when nothing has been served yet).

``differences(old, new)`` says, one line each, how a new version's contract breaks the
serving one's; the upgrade refuses a version with any (unless told to allow it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DTYPES",
    "DYNAMIC",
    "Contract",
    "ContractError",
    "ForwardSchema",
    "NOT_CHECKED_NEW",
    "NOT_CHECKED_SERVING",
    "InputSignature",
    "TensorSpec",
    "TensorType",
    "differences",
    "merge_shapes",
]

# torch/numpy names of the element types the wire, the manifest and the contract use.
DTYPES: frozenset[str] = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }
)
DYNAMIC = -1  # a dimension that varies between requests (the batch, a sequence length)
MAX_RANK = 16
MAX_TENSORS = 64
MAX_EXAMPLES = 8
# What an upgrade's result and ``describe`` say when a contract is not known: nothing
# gave dtypes and shapes, so there was nothing to compare (never a silent "kept").
NOT_CHECKED_SERVING = (
    "not checked (no example inputs): the serving version's contract is not known "
    "(no manifest inputs, no example_inputs in its file, nothing served yet)"
)
NOT_CHECKED_NEW = (
    "not checked (no example inputs): the new version's contract is not known (no warm-up inputs)"
)


class ContractError(ValueError):
    """A contract or signature record that does not check out (bad wire data)."""


def _dims(value: Any, what: str, dynamic: bool) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_RANK:
        raise ContractError(f"{what}: shape must be a list of at most {MAX_RANK} integers")
    low = DYNAMIC if dynamic else 0
    for n in value:
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise ContractError(f"{what}: bad dimension {n!r} in shape {list(value)!r}")
    return tuple(value)


def _dtype(value: Any, what: str) -> str:
    if value not in DTYPES:
        raise ContractError(f"{what}: unknown dtype {value!r}")
    return str(value)


def _list(value: Any, what: str, limit: int = MAX_TENSORS) -> list[Any]:
    if not isinstance(value, list | tuple) or len(value) > limit:
        raise ContractError(f"{what}: must be a list of at most {limit}")
    return list(value)


@dataclass(frozen=True)
class TensorType:
    """One tensor of one request: its dtype and its concrete shape."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class InputSignature:
    """The positional inputs of one request, in order."""

    inputs: tuple[TensorType, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"inputs": [{"dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs]}

    @classmethod
    def from_wire(cls, value: Any) -> InputSignature:
        if not isinstance(value, Mapping):
            raise ContractError(f"an input signature is a map with 'inputs', got {value!r:.80}")
        items = _list(value.get("inputs"), "signature.inputs")
        tensors = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise ContractError(f"signature.inputs[{i}] must be a map")
            what = f"signature.inputs[{i}]"
            tensors.append(
                TensorType(_dtype(item.get("dtype"), what), _dims(item.get("shape"), what, False))
            )
        return cls(tuple(tensors))

    @classmethod
    def of(cls, pairs: Sequence[tuple[str, Sequence[int]]]) -> InputSignature:
        """From ``(dtype, shape)`` pairs built by trusted code (tests, the worker)."""
        return cls(tuple(TensorType(d, tuple(int(n) for n in s)) for d, s in pairs))

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.inputs) + ")"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a version: dynamic dimensions are ``-1``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch_dim: int | None = None  # 0 when the tensor follows the batch, else None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "batch_dim": self.batch_dim,
        }

    @classmethod
    def from_json(cls, value: Any, what: str) -> TensorSpec:
        if not isinstance(value, Mapping):
            raise ContractError(f"{what} must be a map")
        name = value.get("name")
        if not isinstance(name, str) or len(name) > 200:
            raise ContractError(f"{what}.name must be a string")
        batch_dim = value.get("batch_dim")
        if batch_dim is not None and (isinstance(batch_dim, bool) or batch_dim != 0):
            raise ContractError(f"{what}.batch_dim must be 0 or null, got {batch_dim!r}")
        return cls(
            name,
            _dtype(value.get("dtype"), what),
            _dims(value.get("shape"), what, True),
            batch_dim,
        )

    def __str__(self) -> str:
        dims = ", ".join(
            "N" if i == self.batch_dim else ("?" if n < 0 else str(n))
            for i, n in enumerate(self.shape)
        )
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass(frozen=True)
class Contract:
    """What one version takes and returns. ``source`` says where it came from:
    "manifest" (declared inputs, probed outputs) or "probe" (inputs a client or the
    serving version's contract supplied, outputs from running them)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batchable: bool
    examples: tuple[InputSignature, ...] = ()
    source: str = "probe"

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "batchable": self.batchable,
            "examples": [s.to_wire() for s in self.examples],
            "source": self.source,
        }

    @classmethod
    def from_json(cls, value: Any) -> Contract:
        if not isinstance(value, Mapping):
            raise ContractError("a contract is a map")
        batchable = value.get("batchable")
        if not isinstance(batchable, bool):
            raise ContractError("contract.batchable must be true or false")
        source = value.get("source", "probe")
        return cls(
            tuple(
                TensorSpec.from_json(v, f"contract.inputs[{i}]")
                for i, v in enumerate(_list(value.get("inputs"), "contract.inputs"))
            ),
            tuple(
                TensorSpec.from_json(v, f"contract.outputs[{i}]")
                for i, v in enumerate(_list(value.get("outputs"), "contract.outputs"))
            ),
            batchable,
            tuple(
                InputSignature.from_wire(v)
                for v in _list(value.get("examples", []), "contract.examples", MAX_EXAMPLES)
            ),
            source if isinstance(source, str) else "probe",
        )


@dataclass(frozen=True)
class ForwardSchema:
    """forward()'s signature as the model file states it, known without running it:
    ``(name, type)`` per positional argument (the type as the format spells it:
    "Tensor" in TorchScript, "float32[s0, 16]" from torch.export, "" when unknown) and
    the return type ("" when unknown). Shown while the contract is not known."""

    inputs: tuple[tuple[str, str], ...]
    returns: str

    def to_wire(self) -> dict[str, Any]:
        return {"inputs": [[n, t] for n, t in self.inputs], "returns": self.returns}

    @classmethod
    def from_wire(cls, value: Any) -> ForwardSchema:
        if not isinstance(value, Mapping):
            raise ContractError("a forward schema is a map")
        items = _list(value.get("inputs"), "schema.inputs")
        inputs = []
        for item in items:
            ok = isinstance(item, list | tuple) and len(item) == 2
            if not ok or not all(isinstance(x, str) and len(x) <= 200 for x in item):
                raise ContractError(f"schema.inputs: bad argument {item!r:.80}")
            inputs.append((str(item[0]), str(item[1])))
        returns = value.get("returns")
        if not isinstance(returns, str) or len(returns) > 400:
            raise ContractError("schema.returns must be a string")
        return cls(tuple(inputs), returns)

    def __str__(self) -> str:
        args = ", ".join(f"{n}: {t}" if t else n for n, t in self.inputs)
        return f"forward({args})" + (f" -> {self.returns}" if self.returns else "")


def merge_shapes(shapes: Sequence[Sequence[int]]) -> tuple[int, ...] | None:
    """One shape covering ``shapes`` (same rank): a dimension that differs becomes -1.
    None when the ranks differ."""
    if not shapes:
        return None
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        return None
    return tuple(
        dims[0] if all(n == dims[0] for n in dims) else DYNAMIC
        for dims in zip(*shapes, strict=True)
    )


def _describe_side(kind: str, old: Sequence[TensorSpec], new: Sequence[TensorSpec]) -> list[str]:
    if len(old) != len(new):
        serving = ", ".join(map(str, old)) or "none"
        offered = ", ".join(map(str, new)) or "none"
        return [
            f"{kind}: the new version has {len(new)}, the serving version {len(old)} "
            f"(serving: {serving}; new: {offered})"
        ]
    out = []
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        what = f"{kind[:-1]} {i} ({a.name})"
        if a.dtype != b.dtype:
            out.append(f"{what}: dtype {b.dtype} in the new version, {a.dtype} serving")
        if len(a.shape) != len(b.shape):
            out.append(
                f"{what}: rank {len(b.shape)} in the new version, {len(a.shape)} serving "
                f"(new {b}, serving {a})"
            )
        elif a.batch_dim != b.batch_dim:

            def follows(t: TensorSpec) -> str:
                return "follows the batch" if t.batch_dim == 0 else "does not follow the batch"

            out.append(
                f"{what}: {follows(b)} in the new version, {follows(a)} serving "
                f"(new {b}, serving {a})"
            )
        else:
            fixed = [
                (d, x, y)
                for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True))
                if x != y and x != DYNAMIC and y != DYNAMIC
            ]
            # An input dimension the serving version takes at any size but the new one
            # only at one size: requests it is sent today would fail.
            narrowed = [
                (d, y)
                for d, (x, y) in enumerate(zip(a.shape, b.shape, strict=True))
                if kind == "inputs" and x == DYNAMIC and y != DYNAMIC
            ]
            if fixed:
                d, x, y = fixed[0]
                out.append(
                    f"{what}: dimension {d} is {y} in the new version, {x} serving "
                    f"(new {b}, serving {a})"
                )
            elif narrowed:
                d, y = narrowed[0]
                out.append(
                    f"{what}: dimension {d} takes only {y} in the new version, any size "
                    f"serving (new {b}, serving {a})"
                )
    return out


def differences(old: Contract, new: Contract) -> list[str]:
    """How ``new`` breaks ``old``, one readable line each; [] when it keeps it."""
    out = _describe_side("inputs", old.inputs, new.inputs)
    out += _describe_side("outputs", old.outputs, new.outputs)
    if old.batchable and not new.batchable and not out:
        out.append("batching: the new version cannot be batched, the serving version can")
    return out
