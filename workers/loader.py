"""Load a model file onto one device, without ever unpickling untrusted data.

Formats, chosen by file extension:

- ``.pt`` ``.pth`` ``.ts`` ``.torchscript``: TorchScript, ``torch.jit.load``.
- ``.pt2``: ``torch.export``. ``torch.export.load`` falls back to full pickle for some
  archive entries, so the archive is inspected first and refused when any entry would
  take that path (``workers.pt2_check``).
- ``.safetensors``: "factory + safetensors". The manifest names ``factory =
  "net.py:build"``, a Python file inside the model's directory and a callable returning
  an ``nn.Module``. The module is built on the meta device (no memory, no init cost),
  then the weights are read straight onto the target device and assigned. The header is
  checked strictly first (``workers.weights``), and a CUDA device gets the weights
  streamed through pinned memory by several reader threads.

Every failure is a ``ModelLoadError`` whose message names the file and the cause.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import safetensors.torch
import torch

from workers import weights
from workers.load_errors import (  # noqa: F401  re-exported: callers use loader.*
    ModelLoadError,
    ModelOutputError,
    _bounded,
    describe_error,
)
from workers.manifest import Manifest, ManifestError, load_manifest
from workers.pt2_check import check_pickle_free

__all__ = [
    "FORMATS",
    "LoadedModel",
    "ModelLoadError",
    "ModelOutputError",
    "describe_error",
    "load_model",
]

FORMATS: dict[str, str] = {
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
    ".torchscript": "torchscript",
    ".pt2": "export",
    ".safetensors": "safetensors",
}

_factory_counter = itertools.count()


@dataclass
class LoadedModel:
    module: torch.nn.Module | torch.jit.ScriptModule
    device: torch.device
    format: str
    num_inputs: int | None
    path: str = ""
    # forward()'s positional argument names (the contract's input names); () if unknown.
    input_names: tuple[str, ...] = ()

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run ``module(*inputs)`` and return the outputs as a list of tensors."""
        moved = [x if x.device == self.device else x.to(self.device) for x in inputs]
        with torch.inference_mode():
            out = self.module(*moved)
        return _as_tensor_list(out)


def _as_tensor_list(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, tuple | list):
        for i, item in enumerate(out):
            if not isinstance(item, torch.Tensor):
                raise ModelOutputError(
                    "model output must be a tensor or a tuple/list of tensors; "
                    f"element {i} of the {type(out).__name__} is {type(item).__name__}"
                )
        return list(out)
    raise ModelOutputError(
        f"model output must be a tensor or a tuple/list of tensors, got {type(out).__name__}"
    )


def load_model(
    path: str,
    device: torch.device | str,
    manifest: Manifest | None = None,
    progress: Callable[[int], None] | None = None,
) -> LoadedModel:
    """Load ``path`` onto ``device``. ``manifest`` is read from disk when not given and
    the format needs one (safetensors). ``progress`` is called with byte counts as the
    file is read (``workers.load_progress``)."""
    device = torch.device(device)
    ext = os.path.splitext(path)[1].lower()
    fmt = FORMATS.get(ext)
    if fmt is None:
        known = ", ".join(FORMATS)
        raise ModelLoadError(
            f"{path}: unsupported model format {ext or '(none)'!r}; known: {known}"
        )
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    streamed = fmt == "safetensors" and device.type == "cuda"
    if progress is not None and not streamed:
        weights.read_through(path, progress)

    if fmt == "torchscript":
        module: torch.nn.Module = _load_torchscript(path, device)
        num_inputs = _script_num_inputs(module, path)
        names = _script_input_names(module)
    elif fmt == "export":
        module = _load_export(path, device)
        num_inputs = _signature_num_inputs(module)
        names = _signature_input_names(module)
    else:
        module = _load_safetensors(path, device, manifest, progress)
        num_inputs = _signature_num_inputs(module)
        names = _signature_input_names(module)
    return LoadedModel(
        module=module,
        device=device,
        format=fmt,
        num_inputs=num_inputs,
        path=path,
        input_names=names,
    )


def _load_torchscript(path: str, device: torch.device) -> torch.nn.Module:
    try:
        module = torch.jit.load(path, map_location=device)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load as TorchScript: {describe_error(e)}") from e
    return module.eval()


def _script_num_inputs(module: torch.nn.Module, path: str) -> int | None:
    try:
        schema = getattr(module.forward, "schema")  # noqa: B009  (only script methods have it)
    except (AttributeError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: TorchScript module has no forward method") from e
    args = [a for a in schema.arguments[1:] if not a.kwarg_only]  # [0] is self
    # An optional positional argument makes the count a range: report it as unknown.
    if any(a.has_default_value() for a in args):
        return None
    return len(args)


def input_names_of(module: torch.nn.Module, fmt: str) -> tuple[str, ...]:
    """forward()'s positional argument names (the contract's input names)."""
    if fmt == "torchscript":
        return _script_input_names(module)
    return _signature_input_names(module)


def _script_input_names(module: torch.nn.Module) -> tuple[str, ...]:
    schema = getattr(module.forward, "schema", None)
    if schema is None:
        return ()
    return tuple(a.name for a in schema.arguments[1:] if not a.kwarg_only)


def _signature_input_names(module: torch.nn.Module) -> tuple[str, ...]:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in sig.parameters.values() if p.kind in kinds)


def _signature_num_inputs(module: torch.nn.Module) -> int | None:
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    count = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if p.default is not p.empty:
                return None
            count += 1
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None  # module(*inputs) can never satisfy it
    return count


def _load_export(path: str, device: torch.device) -> torch.nn.Module:
    check_pickle_free(path)
    try:
        program = torch.export.load(path)
        module = program.module()
        # An exported module fixes train/eval at export time; .eval() is not supported.
        return module.to(device)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: cannot load as torch.export program: {describe_error(e)}"
        ) from e


def _load_safetensors(
    path: str,
    device: torch.device,
    manifest: Manifest | None,
    progress: Callable[[int], None] | None = None,
) -> torch.nn.Module:
    module = build_factory_module(path, manifest)
    return assign_weights(path, module, _read_safetensors(path, device, progress))


def build_factory_module(path: str, manifest: Manifest | None) -> torch.nn.Module:
    """The module a safetensors model's factory builds, on the meta device."""
    if manifest is None:
        try:
            manifest = load_manifest(path)
        except ManifestError as e:
            raise ModelLoadError(f"{path}: bad manifest: {e}") from e
    if manifest is None or manifest.factory is None:
        raise ModelLoadError(
            f'{path}: a .safetensors model needs a manifest with factory = "file.py:callable" '
            "(<stem>.toml or model.toml beside it)"
        )
    build = _import_factory(path, manifest.factory)
    try:
        # Parameters on meta cost nothing; the real ones are assigned below.
        with torch.device("meta"):
            module = build()
    except Exception as e:
        raise ModelLoadError(
            f"{path}: factory {manifest.factory} raised: {describe_error(e)}"
        ) from e
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"{path}: factory {manifest.factory} returned {type(module).__name__}, "
            "not a torch.nn.Module"
        )
    return module


def assign_weights(
    path: str, module: torch.nn.Module, state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """Put ``state`` into the meta-device ``module`` built by its factory."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except Exception as e:
        raise ModelLoadError(
            f"{path}: weights do not fit the module built by its factory: {describe_error(e)}"
        ) from e
    # A non-persistent buffer is not in any state dict, so it would stay on meta.
    left = [
        n
        for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
        if t.is_meta
    ]
    if left:
        raise ModelLoadError(
            f"{path}: {', '.join(left)} not set by the weights file (still on the meta "
            f"device); the factory must not rely on non-persistent buffers"
        )
    return module.eval()


def _read_safetensors(
    path: str, device: torch.device, progress: Callable[[int], None] | None = None
) -> dict[str, torch.Tensor]:
    """The weights of ``path`` on ``device``. Every device gets workers.weights' strict
    header checks; CUDA gets its pinned, multi-threaded copy (safetensors' own copies from
    pageable memory, which the driver stages through a small buffer of its own); the CPU
    keeps safetensors' mmap, which copies nothing."""
    try:
        if device.type == "cuda":
            return weights.load_file(path, device, progress=progress)
        weights.read_header(path)
        return safetensors.torch.load_file(path, device=str(device))
    except weights.SafetensorsError as e:
        raise ModelLoadError(f"{path}: cannot read safetensors weights: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read safetensors weights: {describe_error(e)}") from e


def _import_factory(path: str, spec: str) -> Callable[[], Any]:
    file, _, name = spec.rpartition(":")
    model_dir = os.path.dirname(os.path.realpath(path))
    source = os.path.realpath(os.path.join(model_dir, file))
    # Code must ship with the weights it builds: no reaching outside the model's directory.
    if os.path.commonpath([model_dir, source]) != model_dir:
        raise ModelLoadError(f"{path}: factory file {file!r} is outside the model directory")
    if not os.path.isfile(source):
        raise ModelLoadError(f"{path}: factory file {source} does not exist")
    module_name = f"_gpu_pool_factory_{os.getpid()}_{next(_factory_counter)}"
    import_spec = importlib.util.spec_from_file_location(module_name, source)
    if import_spec is None or import_spec.loader is None:
        raise ModelLoadError(f"{path}: factory file {source} cannot be imported")
    mod: ModuleType = importlib.util.module_from_spec(import_spec)
    # Registered before exec so that dataclasses and typing in the file can find it.
    sys.modules[module_name] = mod
    try:
        import_spec.loader.exec_module(mod)
    except BaseException as e:
        del sys.modules[module_name]
        if not isinstance(e, Exception):
            raise
        raise ModelLoadError(
            f"{path}: factory file {source} failed to import: {describe_error(e)}"
        ) from e
    build = getattr(mod, name, None)
    if build is None or not callable(build):
        raise ModelLoadError(f"{path}: factory file {source} has no callable {name!r}")
    return build
