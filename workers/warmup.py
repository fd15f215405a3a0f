"""Warm a freshly loaded model up and check it against its golden cases.

Warm-up inputs are synthetic: floats uniform in [0, 1) from a fixed seed, integers and
bools all zero. Zero is a valid index for any embedding, and non-negative values keep
models that reject negative input (see tests/modelkit.py) out of trouble; the values
only have to exercise the kernels, not mean anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from pool.contract import InputSignature
from workers.loader import LoadedModel, describe_error
from workers.manifest import DTYPE_NAMES, Manifest

__all__ = [
    "TORCH_DTYPES",
    "ValidationError",
    "WarmupError",
    "example_inputs",
    "validate",
    "warm_up",
]

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
assert set(TORCH_DTYPES) == DTYPE_NAMES  # the two tables must not drift apart


class WarmupError(Exception):
    """The model failed on its warm-up inputs."""


class ValidationError(Exception):
    """The model's outputs differ from its golden cases (or it failed on one)."""


def example_inputs(
    manifest: Manifest | None,
    signatures: Sequence[InputSignature] | None,
    device: torch.device | str,
) -> list[list[torch.Tensor]]:
    """Input sets for warm-up.

    From the manifest's ``inputs`` when it has any: one set per warm-up batch size, each
    example's first dimension replaced by that size (0-d inputs are used as they are).
    Otherwise one set per ``signatures`` entry: what the serving version was sent, and
    the examples of its contract (``pool.contract``). ``[]`` when there is neither.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    if manifest is not None and manifest.inputs:
        sets = []
        for size in manifest.warmup_batch_sizes:
            tensors = []
            for spec in manifest.inputs:
                shape = (size, *spec.shape[1:]) if spec.shape else ()
                tensors.append(_synthetic(spec.dtype, shape, gen, device))
            sets.append(tensors)
        return sets
    return [
        [_synthetic(t.dtype, t.shape, gen, device) for t in sig.inputs] for sig in signatures or ()
    ]


def served_sets(
    model: LoadedModel,
    manifest: Manifest | None,
    signatures: Sequence[InputSignature],
    device: torch.device | str,
    outputs: list[list[torch.Tensor]],
) -> list[list[torch.Tensor]]:
    """With manifest inputs, also try the signatures the serving version is sent that have
    the manifest's dtypes and ranks (a sequence length the manifest did not list); the
    sets the model takes are returned (their outputs appended to ``outputs``) and join
    the contract. One it fails on is left out, not a warm-up failure: the contract then
    shows the narrower input and the upgrade's contract check names it (which
    --allow-contract-change may override)."""
    if manifest is None or not manifest.inputs:
        return []
    want = [(spec.dtype, len(spec.shape)) for spec in manifest.inputs]
    fits = [s for s in signatures if [(t.dtype, len(t.shape)) for t in s.inputs] == want]
    taken = []
    for inputs in example_inputs(None, fits, device):
        try:
            out = model.forward(inputs)
            _synchronize(model.device)
        except Exception as exc:  # noted in the contract, not fatal: see above
            log.info("model does not take %s: %s", _describe(inputs), describe_error(exc))
            continue
        taken.append(inputs)
        outputs.append(out)
    return taken


def _synthetic(
    dtype_name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    dtype = TORCH_DTYPES[dtype_name]
    if dtype.is_floating_point:
        # Drawn on the CPU: a CPU generator cannot feed a CUDA tensor directly.
        return torch.rand(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def warm_up(
    model: LoadedModel,
    input_sets: Sequence[Sequence[torch.Tensor]],
    outputs: list[list[torch.Tensor]] | None = None,
) -> float:
    """Run every input set once; return the seconds it took (device work included).
    Each set's outputs are appended to ``outputs`` when given (for the contract)."""
    t0 = time.monotonic()
    for i, inputs in enumerate(input_sets):
        try:
            out = model.forward(inputs)
            if outputs is not None:
                outputs.append(out)
            # Kernel errors surface at synchronisation, so each set is attributed right.
            _synchronize(model.device)
        except Exception as e:
            raise WarmupError(
                f"warm-up input set {i} ({_describe(inputs)}) failed: {describe_error(e)}"
            ) from e
    return time.monotonic() - t0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in inputs)


def validate(model: LoadedModel, manifest: Manifest | None) -> int:
    """Compare the model with each golden case; return how many cases passed."""
    if manifest is None:
        return 0
    for i, case in enumerate(manifest.golden):
        # torch.tensor copies: arrays from np.load may be read-only, which from_numpy warns on.
        inputs = [torch.tensor(a) for a in case.inputs]
        try:
            outputs = model.forward(inputs)
            _synchronize(model.device)
        except Exception as e:
            raise ValidationError(f"golden case {i}: forward failed: {describe_error(e)}") from e
        if len(outputs) != len(case.outputs):
            raise ValidationError(
                f"golden case {i}: model returned {len(outputs)} output(s), "
                f"golden has {len(case.outputs)}"
            )
        for k, (out, expected) in enumerate(zip(outputs, case.outputs, strict=True)):
            actual = _to_numpy(out)
            if actual.shape != expected.shape:
                raise ValidationError(
                    f"golden case {i} output {k}: shape {list(actual.shape)} "
                    f"!= golden {list(expected.shape)}"
                )
            a = actual.astype(np.float64)
            b = expected.astype(np.float64)
            _compare(a, b, manifest.rtol, manifest.atol, f"golden case {i} output {k}")
    return len(manifest.golden)


def _compare(a: np.ndarray, b: np.ndarray, rtol: float, atol: float, what: str) -> None:
    # np.allclose semantics; NaN where golden has NaN is the same behaviour, not a difference.
    close = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return
    bad = ~close
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    finite = bad & np.isfinite(diff)
    worst = float(diff[finite].max()) if finite.any() else float("nan")
    first = tuple(int(n) for n in np.argwhere(bad)[0])
    raise ValidationError(
        f"{what}: {int(bad.sum())} of {a.size} values differ, max abs difference {worst:.6g} "
        f"(first at index {list(first)}: got {a[first]:.6g}, golden {b[first]:.6g}; "
        f"rtol={rtol:g}, atol={atol:g})"
    )


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()
