"""A loaded model's contract, found by running it (``pool.contract`` holds the records).

The inputs come from the warm-up sets (the manifest's, or what the serving version was
sent); the outputs are what the model returned for them. Whether the model can be
batched is asked of the model itself: one more forward with the batch grown by one row.
Each output must then have grown by one row too; an output that did not (a 0-d result,
one row whatever the batch, a fixed-size table) means the rows cannot be told apart, and
the model is served one request per forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from pool.contract import (
    DYNAMIC,
    MAX_EXAMPLES,
    Contract,
    ContractError,
    InputSignature,
    TensorSpec,
    TensorType,
    merge_shapes,
)
from workers.loader import LoadedModel, describe_error
from workers.manifest import Manifest
from workers.warmup import TORCH_DTYPES

__all__ = [
    "ProbeError",
    "contract_of",
    "probe_contract",
    "signature_of",
    "signatures_from_wire",
    "types_of",
]

log = logging.getLogger(__name__)

DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class ProbeError(Exception):
    """The model's outputs cannot be served (a dtype the wire cannot carry)."""


def _name(t: torch.Tensor, what: str) -> str:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        known = ", ".join(sorted(DTYPE_NAMES.values()))
        raise ProbeError(f"{what} has dtype {t.dtype}, which the wire cannot carry ({known})")
    return name


def types_of(tensors: Sequence[torch.Tensor]) -> tuple[TensorType, ...]:
    return tuple(TensorType(_name(t, f"tensor {i}"), tuple(t.shape)) for i, t in enumerate(tensors))


def signature_of(inputs: Sequence[torch.Tensor]) -> InputSignature:
    return InputSignature(types_of(inputs))


def _batch_rows(inputs: Sequence[torch.Tensor]) -> int | None:
    """The rows of a set whose inputs all share a first dimension; None otherwise."""
    if not inputs or any(t.dim() == 0 for t in inputs):
        return None
    rows = int(inputs[0].shape[0])
    return rows if rows > 0 and all(int(t.shape[0]) == rows for t in inputs) else None


def _grown(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat([t, t[:1]]) for t in inputs]


def probe_contract(
    model: LoadedModel,
    sets: Sequence[Sequence[torch.Tensor]],
    seen: Sequence[Sequence[torch.Tensor]],
    *,
    output_names: Sequence[str] = (),
    input_names: Sequence[str] = (),
    source: str = "probe",
) -> Contract | None:
    """The contract of ``model`` from input ``sets`` and the outputs ``seen`` for them
    (one list per set, from warm-up); None without any set. Runs one extra forward."""
    pairs = [(list(i), list(o)) for i, o in zip(sets, seen, strict=True)]
    if not pairs:
        return None
    first = types_of(pairs[0][0])
    # Sets that disagree with the first on count or dtypes are not the same contract.
    pairs = [
        (i, o)
        for i, o in pairs
        if [t.dtype for t in types_of(i)] == [t.dtype for t in first] and len(o) == len(pairs[0][1])
    ]
    follows = _follows_batch(model, pairs)
    batchable = follows is not None and all(follows)
    names = list(input_names) if len(input_names) == len(first) else []
    inputs = tuple(
        _spec(
            names[k] if names else f"input{k}",
            first[k].dtype,
            [tuple(i[k].shape) for i, _ in pairs],
            batchable,
        )
        for k in range(len(first))
    )
    n_out = len(pairs[0][1])
    out_names = list(output_names) if len(output_names) == n_out else []
    outputs = tuple(
        _spec(
            out_names[k] if out_names else f"output{k}",
            _name(pairs[0][1][k], f"output {k}"),
            [tuple(o[k].shape) for _, o in pairs],
            bool(follows and follows[k]),
        )
        for k in range(n_out)
    )
    examples = tuple(signature_of(i) for i, _ in pairs[:MAX_EXAMPLES])
    return Contract(inputs, outputs, batchable, examples, source)


def _spec(name: str, dtype: str, shapes: list[tuple[int, ...]], batched: bool) -> TensorSpec:
    merged = merge_shapes(shapes) or shapes[0]
    if batched and merged:
        return TensorSpec(name, dtype, (DYNAMIC, *merged[1:]), 0)
    return TensorSpec(name, dtype, tuple(merged), None)


def _follows_batch(
    model: LoadedModel, pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]]
) -> list[bool] | None:
    """Per output, whether its first dimension follows the batch; None when the inputs
    have no common batch dimension or the model refuses a batch one row larger."""
    for inputs, outputs in pairs:
        rows = _batch_rows(inputs)
        if rows is None:
            continue
        try:
            grown = model.forward(_grown(inputs))
        except Exception as exc:  # a model fixed to its batch size: serve it unbatched
            log.info("model does not take a batch of %d: %s", rows + 1, describe_error(exc))
            return None
        if len(grown) != len(outputs):
            return None
        return [
            o.dim() > 0 and g.dim() > 0 and int(o.shape[0]) == rows and int(g.shape[0]) == rows + 1
            for o, g in zip(outputs, grown, strict=True)
        ]
    return None


def signatures_from_wire(values: Sequence[object], wid: str) -> list[InputSignature]:
    """Warm-up signatures from the spawn spec; a malformed one is logged and skipped."""
    out = []
    for value in values:
        try:
            out.append(InputSignature.from_wire(value))
        except ContractError as exc:  # a supervisor bug: warm up on the rest
            log.warning("worker %s: ignoring warm-up signature: %s", wid, exc)
    return out


def contract_of(
    model: LoadedModel,
    manifest: Manifest | None,
    sets: Sequence[Sequence[torch.Tensor]],
    seen: Sequence[Sequence[torch.Tensor]],
    source: str,
) -> Contract | None:
    """``probe_contract`` with the names a manifest gives (inputs default to forward()'s
    argument names, outputs to ``output<k>``)."""
    input_names = model.input_names
    output_names: tuple[str, ...] = ()
    if manifest is not None:
        output_names = manifest.output_names
        if any(s.name for s in manifest.inputs):
            input_names = tuple(s.name or f"input{i}" for i, s in enumerate(manifest.inputs))
    return probe_contract(
        model, sets, seen, input_names=input_names, output_names=output_names, source=source
    )
