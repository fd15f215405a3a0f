"""What a model file says about its inputs before it has served anything.

A fresh model with no manifest and no traffic still has two sources:

- **forward()'s schema**: the argument names always; the types as the format spells them
  (TorchScript says only ``Tensor``; a ``torch.export`` program gives dtype and shape,
  a symbolic dimension such as the batch as ``s0``) and what it returns.
- **example inputs the file carries**: a TorchScript or factory module's
  ``example_inputs`` attribute (a tensor, a tuple/list of tensors, or a list of such
  tuples), or the example a ``torch.export`` program was traced with (its placeholders'
  dtypes and shapes, a symbolic dimension at its traced size).

The examples are warm-up sets like any other: the worker runs them at load time (the
probe), so the contract is known, recorded and checked from the first upgrade on.
Without them nothing tells the dtypes or shapes, and the contract waits for a manifest
or the first request ("not checked (no example inputs)").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from pool.contract import MAX_EXAMPLES, ForwardSchema, InputSignature
from workers.loader import LoadedModel
from workers.manifest import Manifest
from workers.warmup import TORCH_DTYPES, example_inputs

__all__ = ["carried_examples", "forward_schema", "warmup_sets"]

log = logging.getLogger(__name__)

EXAMPLES_ATTR = "example_inputs"
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _one_set(value: Any) -> list[torch.Tensor] | None:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list) and value:
        return list(value) if all(isinstance(t, torch.Tensor) for t in value) else None
    return None


def _attribute_sets(module: torch.nn.Module) -> list[list[torch.Tensor]]:
    try:
        value = getattr(module, EXAMPLES_ATTR)
    except Exception:  # absent (AttributeError), or a property that fails: no examples
        return []
    one = _one_set(value)
    if one is not None:
        return [one]
    if isinstance(value, tuple | list):
        sets = [_one_set(v) for v in value[:MAX_EXAMPLES]]
        if sets and all(s is not None for s in sets):
            return [s for s in sets if s is not None]
    log.warning("ignoring %s: not a tensor, a tuple of tensors or a list of those", EXAMPLES_ATTR)
    return []


def _placeholders(module: torch.nn.Module) -> list[Any]:
    graph = getattr(module, "graph", None)
    if graph is None or not hasattr(graph, "nodes"):
        return []
    return [n for n in graph.nodes if n.op == "placeholder"]


def _export_sets(module: torch.nn.Module) -> list[list[torch.Tensor]]:
    """One set shaped like the fake tensors an exported program's placeholders carry
    (values synthetic, as for any warm-up signature)."""
    pairs: list[tuple[str, tuple[int, ...]]] = []
    for node in _placeholders(module):
        val = node.meta.get("val")
        dtype = DTYPE_NAMES.get(val.dtype) if isinstance(val, torch.Tensor) else None
        if val is None or dtype is None:
            return []  # a non-tensor input (a flag, a list) or an odd dtype: no example
        dims = []
        for d in val.shape:
            hint = getattr(getattr(d, "node", None), "hint", None)
            # A symbolic dimension at the size it was traced with (export specialises 0
            # and 1, so 2 stands in when the hint is gone).
            dims.append(int(d) if isinstance(d, int) else int(hint) if hint is not None else 2)
        pairs.append((dtype, tuple(dims)))
    return example_inputs(None, [InputSignature.of(pairs)], "cpu") if pairs else []


def carried_examples(model: LoadedModel) -> list[list[torch.Tensor]]:
    """The example input sets the model file carries, on the model's device; [] if none.
    A set with a dtype the wire cannot carry is left out."""
    sets = _attribute_sets(model.module)
    if not sets and model.format == "export":
        sets = _export_sets(model.module)
    out = []
    for inputs in sets:
        if any(t.dtype not in DTYPE_NAMES for t in inputs):
            log.warning("ignoring an example input set with a dtype the wire cannot carry")
            continue
        out.append([t.detach().to(model.device).contiguous() for t in inputs])
    return out


def warmup_sets(
    model: LoadedModel,
    manifest: Manifest | None,
    signatures: Sequence[InputSignature],
    device: torch.device | str,
) -> tuple[list[list[torch.Tensor]], str]:
    """Warm-up input sets and the contract source they make: the manifest's inputs
    ("manifest"); else what the serving version is sent and its contract's examples,
    then the examples this file carries ("probe"; "example_inputs" with those alone)."""
    if manifest is not None and manifest.inputs:
        return example_inputs(manifest, signatures, device), "manifest"
    sets = example_inputs(None, signatures, device)
    carried = carried_examples(model)
    return sets + carried, "probe" if sets else "example_inputs"


def _type_of(arg: Any) -> str:
    return str(arg.type)


def forward_schema(model: LoadedModel) -> ForwardSchema | None:
    """forward()'s argument names and types and its return type, as the format says."""
    module = model.module
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript: types are "Tensor", no dtype or shape
        args = [a for a in schema.arguments[1:] if not a.kwarg_only]
        returns = ", ".join(_type_of(r) for r in schema.returns) or "None"
        return ForwardSchema(tuple((a.name, _type_of(a)) for a in args), returns)
    nodes = _placeholders(module)
    if nodes:  # torch.export: the traced fake tensors give dtype and (symbolic) shape
        inputs = []
        for node in nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                dtype = str(val.dtype).removeprefix("torch.")
                inputs.append((node.name, f"{dtype}[{', '.join(str(d) for d in val.shape)}]"))
            else:
                inputs.append((node.name, type(val).__name__))
        return ForwardSchema(tuple(inputs), "")
    if model.input_names:
        return ForwardSchema(tuple((n, "") for n in model.input_names), "")
    return None
