"""The model matrix: small TorchScript models of every shape a user brings (issue 15).

Each ``Case`` builds two versions (seeds 1 and 2), makes request inputs, and says what
``describe`` must show. References are computed by loading the same file in the test
process and running each request alone: the pool's batched answers must equal them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workers.manifest import InputSpec, write_manifest


def _weight(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.rand(*shape, generator=gen) + 0.5).to(dtype), False)


class One(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class Pair(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 3, 1, 1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x1 * self.w + x2, x1 - x2 * self.w


class Three(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
        return [a * self.w + b, b - c, c.sum(1, keepdim=True)]


class Embed(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.table = _weight(seed, 10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.table)


class Half(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 8, dtype=torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + 1.0


class Bf16(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 8, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class Scalar(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum()


class Seq(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1) * self.w


class Single(torch.nn.Module):
    """Takes exactly one row: a model that cannot be batched."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.w = _weight(seed, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) != 1:
            raise RuntimeError("matrixkit: one row at a time")
        return x * self.w


Inputs = Callable[[np.random.Generator], list[object]]


def _f32(*shape: int) -> Inputs:
    return lambda rng: [rng.random(shape, dtype=np.float32)]


@dataclass(frozen=True)
class Case:
    name: str
    module: Callable[[int], torch.nn.Module]
    inputs: Inputs
    manifest: tuple[InputSpec, ...] | None  # None: no manifest beside the file
    batchable: bool
    input_names: tuple[str, ...]
    atol: float = 1e-5

    def build(self, directory: str, seed: int) -> str:
        path = os.path.join(directory, self.name, f"v{seed}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.jit.script(self.module(seed).eval()).save(path)
        if self.manifest is not None:
            write_manifest(os.path.splitext(path)[0] + ".toml", inputs=self.manifest)
        return path


def _rows(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 3))  # requests of one and of two rows


CASES = [
    Case(
        "one",
        One,
        lambda rng: [rng.random((_rows(rng), 16), dtype=np.float32)],
        (InputSpec("float32", (1, 16)),),
        True,
        ("x",),
    ),
    Case(
        "pair",
        Pair,
        lambda rng: [rng.random((1, 3, 16, 16), dtype=np.float32) for _ in range(2)],
        None,
        True,
        ("x1", "x2"),
    ),
    Case(
        "three",
        Three,
        lambda rng: [rng.random((2, 4), dtype=np.float32) for _ in range(3)],
        tuple(InputSpec("float32", (1, 4)) for _ in range(3)),
        True,
        ("a", "b", "c"),
    ),
    Case(
        "embed",
        Embed,
        lambda rng: [rng.integers(0, 10, (_rows(rng), 5), dtype=np.int64)],
        None,
        True,
        ("ids",),
    ),
    Case(
        "half",
        Half,
        lambda rng: [rng.random((_rows(rng), 8)).astype(np.float16)],
        (InputSpec("float16", (1, 8)),),
        True,
        ("x",),
        atol=1e-2,
    ),
    Case(
        "bf16",
        Bf16,
        lambda rng: [
            torch.rand(
                1, 8, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))
            ).to(torch.bfloat16)
        ],
        None,
        True,
        ("x",),
        atol=1e-2,
    ),
    Case("scalar", Scalar, _f32(2, 3), (InputSpec("float32", (1, 3)),), False, ("x",)),
    Case(
        "seq",
        Seq,
        lambda rng: [rng.random((1, int(rng.choice([3, 5])), 4), dtype=np.float32)],
        None,
        True,
        ("x",),
    ),
    Case("single", Single, _f32(1, 6), (InputSpec("float32", (1, 6)),), False, ("x",)),
]


def reference(module: torch.jit.ScriptModule, inputs: list[object]) -> list[np.ndarray]:
    """The unbatched answer of a scripted module, as the client receives it."""
    tensors = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in inputs]
    with torch.inference_mode():
        out = module(*tensors)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [(o.float() if o.dtype == torch.bfloat16 else o).numpy() for o in outs]
