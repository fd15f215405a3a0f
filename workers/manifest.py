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

This module imports numpy and the standard library only (no torch), so the supervisor
can read manifests too.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import tomllib
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pool.contract import DTYPES

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

# The names both the manifest and the wire use for tensor element types.
DTYPE_NAMES: frozenset[str] = DTYPES

_TOP_KEYS = frozenset(
    {"factory", "rtol", "atol", "warmup_batch_sizes", "batching", "inputs", "outputs", "golden"}
)
_tmp_counter = itertools.count()
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_GOLDEN_NAME = re.compile(r"case(\d+)_(in|out)(\d+)")


class ManifestError(Exception):
    """A manifest exists but cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class InputSpec:
    dtype: str
    shape: tuple[int, ...]
    name: str = ""  # the contract's name for it; "" = forward()'s argument name


@dataclass(frozen=True)
class GoldenCase:
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]


@dataclass(frozen=True)
class Manifest:
    path: str
    inputs: tuple[InputSpec, ...] = ()
    warmup_batch_sizes: tuple[int, ...] = (1,)
    golden: tuple[GoldenCase, ...] = ()
    rtol: float = 1e-4
    atol: float = 1e-5
    factory: str | None = None
    max_batch: int | None = None
    max_delay_ms: float | None = None
    output_names: tuple[str, ...] = ()  # the contract's names for the outputs, in order


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
    return _Parser(manifest_path, roots).parse(data)


class _Parser:
    def __init__(self, path: str, roots: Sequence[str]) -> None:
        self.path = path
        self.roots = tuple(roots)

    def fail(self, key: str, message: str) -> ManifestError:
        return ManifestError(f"{self.path}: {key}: {message}")

    def parse(self, data: Mapping[str, Any]) -> Manifest:
        self.check_keys(data, _TOP_KEYS, "")
        batching = self.table(data, "batching")
        self.check_keys(batching, frozenset({"max_batch", "max_delay_ms"}), "batching.")
        golden_table = self.table(data, "golden")
        self.check_keys(golden_table, frozenset({"file"}), "golden.")
        return Manifest(
            path=self.path,
            inputs=self.inputs(data.get("inputs", [])),
            warmup_batch_sizes=self.batch_sizes(data.get("warmup_batch_sizes", [1])),
            golden=self.golden(golden_table),
            rtol=self.number(data, "rtol", 1e-4, "rtol"),
            atol=self.number(data, "atol", 1e-5, "atol"),
            factory=self.factory(data.get("factory")),
            max_batch=self.optional_positive_int(batching.get("max_batch"), "batching.max_batch"),
            max_delay_ms=self.optional_number(batching, "max_delay_ms", "batching.max_delay_ms"),
            output_names=self.outputs(data.get("outputs", [])),
        )

    def check_keys(self, table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(prefix + key, f"unknown key (known: {', '.join(sorted(allowed))})")

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {type(value).__name__}")
        return value

    def number(self, data: Mapping[str, Any], key: str, default: float, name: str) -> float:
        value = self.optional_number(data, key, name)
        return default if value is None else value

    def optional_number(self, data: Mapping[str, Any], key: str, name: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        # bool is an int subclass; `rtol = true` is a mistake, not 1.0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise self.fail(name, f"must be a finite number >= 0, got {value!r}")
        return float(value)

    def positive_int(self, value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(name, f"must be an integer >= 1, got {value!r}")
        return value

    def optional_positive_int(self, value: Any, name: str) -> int | None:
        return None if value is None else self.positive_int(value, name)

    def batch_sizes(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail("warmup_batch_sizes", f"must be a non-empty list, got {value!r}")
        return tuple(
            self.positive_int(size, f"warmup_batch_sizes[{i}]") for i, size in enumerate(value)
        )

    def factory(self, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail("factory", f"must be a string 'file.py:callable', got {value!r}")
        file, sep, name = value.rpartition(":")
        if not sep or not file or not name.isidentifier():
            raise self.fail("factory", f"must look like 'file.py:callable', got {value!r}")
        return value

    def inputs(self, value: Any) -> tuple[InputSpec, ...]:
        if not isinstance(value, list):
            raise self.fail("inputs", "must be an array of tables ([[inputs]])")
        specs = []
        for i, item in enumerate(value):
            key = f"inputs[{i}]"
            if not isinstance(item, dict):
                raise self.fail(key, f"must be a table, got {item!r}")
            self.check_keys(item, frozenset({"dtype", "shape", "name"}), key + ".")
            dtype = item.get("dtype")
            if dtype not in DTYPE_NAMES:
                known = ", ".join(sorted(DTYPE_NAMES))
                raise self.fail(key + ".dtype", f"unknown dtype {dtype!r} (known: {known})")
            shape = item.get("shape")
            if not isinstance(shape, list) or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape
            ):
                raise self.fail(key + ".shape", f"must be a list of integers >= 1, got {shape!r}")
            specs.append(InputSpec(dtype=dtype, shape=tuple(shape), name=self.name(item, key)))
        return tuple(specs)

    def name(self, item: Mapping[str, Any], key: str) -> str:
        name = item.get("name", "")
        if not isinstance(name, str) or not _NAME.fullmatch(name or "x"):
            raise self.fail(key + ".name", f"must match {_NAME.pattern}, got {name!r}")
        return name

    def outputs(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail("outputs", "must be an array of tables ([[outputs]])")
        names = []
        for i, item in enumerate(value):
            key = f"outputs[{i}]"
            if not isinstance(item, dict):
                raise self.fail(key, f"must be a table, got {item!r}")
            self.check_keys(item, frozenset({"name"}), key + ".")
            names.append(self.name(item, key) or f"output{i}")
        return tuple(names)

    def golden(self, table: Mapping[str, Any]) -> tuple[GoldenCase, ...]:
        file = table.get("file")
        if file is None:
            return ()
        if not isinstance(file, str) or not file:
            raise self.fail("golden.file", f"must be a file name, got {file!r}")
        golden_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), file)
        # Checked before the file is opened, on realpaths (a symlink inside a root that
        # points out of it is outside): nothing is read, or told, about such a path.
        real = os.path.realpath(golden_path)
        if not any(_inside(real, os.path.realpath(root)) for root in self.roots):
            shown_path = os.path.normpath(golden_path)
            via = "" if real == shown_path else f" (resolves to {real})"
            shown = ", ".join(self.roots) or "(none)"
            raise self.fail("golden.file", f"{shown_path}{via} is outside the model roots: {shown}")
        try:
            # Our own handle: np.load leaks the one it opens when the zip is bad.
            with open(golden_path, "rb") as f:
                npz = np.load(f, allow_pickle=False)
                if not isinstance(npz, np.lib.npyio.NpzFile):
                    raise ValueError("an .npy array, not an .npz archive of named arrays")
                with npz:
                    arrays = {name: npz[name] for name in npz.files}
        except FileNotFoundError as e:
            raise self.fail("golden.file", f"{golden_path}: no such file") from e
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            # ValueError is also what allow_pickle=False raises for object arrays
            raise self.fail("golden.file", f"{golden_path}: cannot read .npz: {e}") from e
        return _golden_cases(arrays, lambda msg: self.fail("golden.file", f"{golden_path}: {msg}"))


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _golden_cases(
    arrays: Mapping[str, np.ndarray], fail: Callable[[str], ManifestError]
) -> tuple[GoldenCase, ...]:
    found: dict[int, dict[str, dict[int, np.ndarray]]] = {}
    for name, array in arrays.items():
        m = _GOLDEN_NAME.fullmatch(name)
        if m is None:
            raise fail(f"unexpected array {name!r} (expected case<i>_in<j> / case<i>_out<k>)")
        case, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
        found.setdefault(case, {"in": {}, "out": {}})[kind][index] = array
    if not found:
        raise fail("holds no golden cases")
    cases = []
    for case in range(len(found)):
        if case not in found:
            raise fail(f"case{case} is missing (cases are numbered from 0 without gaps)")
        parts: dict[str, list[np.ndarray]] = {}
        for kind in ("in", "out"):
            by_index = found[case][kind]
            if not by_index:
                raise fail(f"case{case} has no {kind}put arrays")
            missing = [i for i in range(len(by_index)) if i not in by_index]
            if missing:
                raise fail(f"case{case}_{kind}{missing[0]} is missing")
            parts[kind] = [by_index[i] for i in range(len(by_index))]
        cases.append(GoldenCase(inputs=parts["in"], outputs=parts["out"]))
    return tuple(cases)


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
