"""The optional manifest that travels beside a model file.

Lookup: ``<model stem>.toml`` next to the model (``resnet.pt`` -> ``resnet.toml``), else
``model.toml`` in the same directory. No manifest is fine: the model then has no
declared warm-up inputs, no golden cases and no default batching settings.

Every key is optional::

    factory = "net.py:build"          # only for .safetensors: file (relative to the
                                      # model's directory) and a callable -> nn.Module
    rtol = 1e-4                       # golden comparison, np.allclose semantics
    atol = 1e-5
    warmup_batch_sizes = [1, 8]       # each example input is run with its first dim
                                      # replaced by each of these sizes
    [batching]
    max_batch = 32                    # defaults for the pool config's batching keys
    max_delay_ms = 2

    [[inputs]]                        # one table per positional input of forward()
    dtype = "float32"                 # float64 float32 float16 bfloat16 int64 int32
    shape = [1, 16]                   # int16 int8 uint8 bool; batch dim included
    name = "x"                        # optional; default: forward()'s argument name

    [[outputs]]                       # optional, one per output, in order: names only
    name = "logits"                   # (dtypes and shapes are probed at load time)

    [golden]
    file = "golden.npz"               # relative to the manifest's directory; must
                                      # resolve inside the model roots (see below)

The golden file is an ``.npz`` read with ``allow_pickle=False``. Case ``i`` is the arrays
``case{i}_in0, case{i}_in1, ...`` (the positional inputs) and ``case{i}_out0, ...`` (the
expected outputs, a tuple output flattened to a list). Cases are numbered from 0 without
gaps; any other array name is an error, so a typo cannot silently drop a case.

The golden file is read by the worker, so a manifest could otherwise make it open any
file poold's user can read (and tell in its error whether it exists): its realpath must
lie inside one of the pool's ``model_roots`` (the worker is told them), or, read without
roots, inside the manifest's own directory.

Unknown keys are errors too: a manifest is written by hand, and a misspelt
``warmup_batch_size`` should fail the upgrade, not quietly skip warm-up.

These modules import numpy and the standard library only (no torch), so the supervisor
can read manifests too. This one finds and reads a manifest; the records are in
``workers.manifest_types``, the key checks in ``workers.manifest_parse``, the golden
file's in ``workers.manifest_golden``, the writers in ``workers.manifest_write`` (all
re-exported here).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence

from workers.manifest_parse import Parser
from workers.manifest_types import DTYPE_NAMES, GoldenCase, InputSpec, Manifest, ManifestError
from workers.manifest_write import temp_path, write_golden, write_manifest

__all__ = [
    "DTYPE_NAMES",
    "GoldenCase",
    "InputSpec",
    "Manifest",
    "ManifestError",
    "find_manifest",
    "load_manifest",
    "parse_manifest",
    "temp_path",
    "write_golden",
    "write_manifest",
]


def find_manifest(model_path: str) -> str | None:
    """Path of the manifest that belongs to ``model_path``, or None."""
    directory = os.path.dirname(os.path.abspath(model_path))
    stem = os.path.splitext(os.path.basename(model_path))[0]
    for name in (stem + ".toml", "model.toml"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_manifest(model_path: str, roots: Sequence[str] | None = None) -> Manifest | None:
    """The manifest of ``model_path``; None when it has none. ``roots``: see
    ``parse_manifest``."""
    manifest_path = find_manifest(model_path)
    if manifest_path is None:
        return None
    return parse_manifest(manifest_path, roots)


def parse_manifest(manifest_path: str, roots: Sequence[str] | None = None) -> Manifest:
    """Read and check one manifest file (and its golden file).

    ``roots``: the directories the golden file must resolve into (the pool's model
    roots); None: the manifest's own directory."""
    try:
        with open(manifest_path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{manifest_path}: not valid TOML: {e}") from e
    except OSError as e:
        raise ManifestError(f"{manifest_path}: cannot read: {e.strerror or e}") from e
    if roots is None:
        roots = (os.path.dirname(os.path.abspath(manifest_path)),)
    return Parser(manifest_path, roots).parse(data)
