"""Writing a manifest and its golden file, each atomically (write, then rename).

Used by the demo model, the tests and the benchmark scripts to make models with
manifests; the layout is the one ``workers.manifest`` documents and reads.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

import numpy as np

from workers.manifest_types import GoldenCase, InputSpec

_tmp_counter = itertools.count()


def write_golden(path: str, cases: Sequence[GoldenCase]) -> None:
    """Write golden cases as an .npz in the layout the manifest reader expects."""
    arrays: dict[str, np.ndarray] = {}
    for i, case in enumerate(cases):
        for j, a in enumerate(case.inputs):
            arrays[f"case{i}_in{j}"] = np.asarray(a)
        for k, a in enumerate(case.outputs):
            arrays[f"case{i}_out{k}"] = np.asarray(a)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            np.savez(f, allow_pickle=False, **arrays)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_manifest(
    path: str,
    *,
    inputs: Sequence[InputSpec | tuple[str, Sequence[int]]] = (),
    warmup_batch_sizes: Sequence[int] | None = None,
    golden: Sequence[GoldenCase] | None = None,
    golden_file: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    factory: str | None = None,
    max_batch: int | None = None,
    max_delay_ms: float | None = None,
    output_names: Sequence[str] = (),
) -> None:
    """Write a manifest TOML at ``path`` (atomically); keys left at None are omitted.

    With ``golden`` cases, the .npz is written too, as ``golden_file`` (relative to the
    manifest's directory, default ``<manifest stem>.golden.npz``). With only
    ``golden_file``, the manifest refers to an .npz the caller provides.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if golden is not None:
        if golden_file is None:
            golden_file = os.path.splitext(os.path.basename(path))[0] + ".golden.npz"
        write_golden(os.path.join(directory, golden_file), golden)

    lines: list[str] = []
    if factory is not None:
        lines.append(f"factory = {_toml_str(factory)}")
    if rtol is not None:
        lines.append(f"rtol = {float(rtol)!r}")
    if atol is not None:
        lines.append(f"atol = {float(atol)!r}")
    if warmup_batch_sizes is not None:
        lines.append(f"warmup_batch_sizes = [{', '.join(str(int(s)) for s in warmup_batch_sizes)}]")
    if max_batch is not None or max_delay_ms is not None:
        lines.append("\n[batching]")
        if max_batch is not None:
            lines.append(f"max_batch = {int(max_batch)}")
        if max_delay_ms is not None:
            lines.append(f"max_delay_ms = {float(max_delay_ms)!r}")
    for spec in inputs:
        dtype, shape = (spec.dtype, spec.shape) if isinstance(spec, InputSpec) else spec
        lines.append("\n[[inputs]]")
        lines.append(f"dtype = {_toml_str(dtype)}")
        lines.append(f"shape = [{', '.join(str(int(d)) for d in shape)}]")
        if isinstance(spec, InputSpec) and spec.name:
            lines.append(f"name = {_toml_str(spec.name)}")
    for name in output_names:
        lines.append("\n[[outputs]]")
        lines.append(f"name = {_toml_str(name)}")
    if golden_file is not None:
        lines.append("\n[golden]")
        lines.append(f"file = {_toml_str(golden_file)}")

    tmp = temp_path(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def temp_path(path: str) -> str:
    """A fresh name beside ``path`` for write-then-rename (same filesystem, so the
    rename is atomic; created with the umask's mode, unlike mkstemp's 0600)."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{os.getpid()}.{next(_tmp_counter)}.tmp")


def _toml_str(value: str) -> str:
    # JSON string escapes (\\ \" \n \uXXXX ...) are all valid TOML basic-string escapes.
    return json.dumps(value)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
