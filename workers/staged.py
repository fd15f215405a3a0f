"""A model read into host memory first, put on the device later (drain-first upgrades).

A drain-first upgrade exists because the device has no room for two versions. With a
standby the new version's worker already runs; it reads the new weights into host memory
while the old worker still serves (``stage_model``), says "staged", and waits. Once the
old worker has exited and its device memory is back, poold says "go" and
``StagedModel.to_device`` copies the weights over at bus speed: clients wait for the
old worker's drain and exit plus one host-to-device copy and a warm-up, not for a read
of the file.

- safetensors: the checked data region in one pinned buffer (``workers.weights``), the
  module built on meta; on the device, one copy per tensor.
- TorchScript and torch.export: loaded onto the CPU, moved with ``Module.to``.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers import host_pinned, weights
from workers.loader import (
    FORMATS,
    LoadedModel,
    ModelLoadError,
    _load_export,
    _load_torchscript,
    _script_num_inputs,
    _signature_num_inputs,
    assign_weights,
    build_factory_module,
    describe_error,
    input_names_of,
    load_model,
)
from workers.manifest import Manifest

log = logging.getLogger(__name__)

ALIGN = 64  # each tensor's place in a pinned arena: any dtype's alignment, a cache line


@dataclass
class StagedModel:
    path: str
    format: str
    module: torch.nn.Module  # on the host (TorchScript, export) or on meta (safetensors)
    staged: weights.StagedWeights | None = None  # safetensors only
    # TorchScript and export: the pinned memory their host tensors were moved into.
    arena: host_pinned.PinnedArena | None = None

    def release(self) -> None:
        """Give the host copy's pinned memory back (or queue it, if the worker defers)."""
        if self.staged is not None:
            self.staged.release()
        arena, self.arena = self.arena, None
        if arena is not None:
            weights.release_arena(arena)

    def to_device(self, device: torch.device) -> LoadedModel:
        """The model on ``device``; the host copy is released (its pinned memory goes
        back when ``weights.flush_host_frees`` says, if the worker deferred it)."""
        path = self.path
        try:
            if self.staged is not None:
                state = self.staged.to_device(device)
                self.staged.release()
                module = assign_weights(path, self.module, state)
                num_inputs = _signature_num_inputs(module)
            else:
                # Pinned by stage_model (a CUDA device): an asynchronous copy at bus
                # speed; the worker synchronises before it runs the model.
                module = self.module.to(device, non_blocking=device.type == "cuda")
                if self.arena is not None:
                    # The copies read the arena: done before it may be unpinned.
                    torch.cuda.current_stream(device).synchronize()
                    self.release()
                num_inputs = (
                    _script_num_inputs(module, path)
                    if self.format == "torchscript"
                    else _signature_num_inputs(module)
                )
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot move to {device}: {describe_error(e)}") from e
        return LoadedModel(
            module=module,
            device=device,
            format=self.format,
            num_inputs=num_inputs,
            path=path,
            input_names=input_names_of(module, self.format),
        )


def stage_model(
    path: str,
    manifest: Manifest | None,
    pin: bool,
    progress: Callable[[int], None] | None = None,
) -> StagedModel:
    """Read ``path`` into host memory (``pin``: page-locked, for a CUDA device);
    ``progress`` is called with byte counts as the file is read."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    cpu = torch.device("cpu")
    if progress is not None and fmt in ("torchscript", "export") and os.path.isfile(path):
        weights.read_through(path, progress)  # those loaders take the file in one call
    if fmt == "torchscript":
        return StagedModel(path, fmt, *_pinned(_load_torchscript(path, cpu), pin))
    if fmt == "export":
        return StagedModel(path, fmt, *_pinned(_load_export(path, cpu), pin))
    if fmt == "safetensors":
        module = build_factory_module(path, manifest)
        try:
            staged = weights.stage_file(path, pin=pin, progress=progress)
        except weights.SafetensorsError as e:
            raise ModelLoadError(f"{path}: cannot read safetensors weights: {e}") from e
        except Exception as e:
            raise ModelLoadError(
                f"{path}: cannot read safetensors weights: {describe_error(e)}"
            ) from e
        return StagedModel(path, fmt, module, staged)
    load_model(path, cpu, manifest)  # raises the loader's own error for the format
    raise ModelLoadError(f"{path}: cannot be staged")


def _pinned(
    module: torch.nn.Module, pin: bool
) -> tuple[torch.nn.Module, None, host_pinned.PinnedArena | None]:
    """``module`` with its parameters and buffers moved into pinned host memory (``pin``),
    so that ``to_device`` is one asynchronous copy per tensor instead of a copy the
    driver stages through a small pinned buffer of its own. ``.data`` is swapped in place:
    a TorchScript module sees the same tensors. They go into one arena of our own
    (``workers.host_pinned``); where that is refused, into torch's pinned memory; where
    that fails too (no pinned memory left), the rest stay pageable: slower, not wrong."""
    if not pin:
        return module, None, None
    tensors = [
        t
        for t in itertools.chain(module.parameters(), module.buffers())
        if t.device.type == "cpu" and t.numel() and not t.is_pinned()
    ]
    # Around the arena's region cuts: ``.to(device)`` copies each tensor in one call.
    places, total, cuts = host_pinned.layout(
        [t.numel() * t.element_size() if t.is_contiguous() else 0 for t in tensors], ALIGN
    )
    arena = weights.pinned_arena(total, cuts)
    try:
        with torch.no_grad():
            for t, at in zip(tensors, places, strict=True):
                if arena is not None and t.is_contiguous():
                    nbytes = t.numel() * t.element_size()
                    dst = arena.tensor[at : at + nbytes].view(t.dtype).view(t.shape)
                    dst.copy_(t)
                    t.data = dst
                else:
                    t.data = t.data.pin_memory()
    except RuntimeError as e:
        log.warning(
            "%s: staged tensors left pageable: %s", getattr(module, "original_name", "model"), e
        )
    return module, None, arena
