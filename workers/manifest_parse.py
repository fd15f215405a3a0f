"""Checking a manifest's TOML, key by key, into a ``Manifest`` record.

Every key is optional and every unknown key is an error: a manifest is written by hand,
and a misspelt key should fail the upgrade, not be skipped. Each error names the file
and the key (``workers.manifest`` documents the format).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from workers.manifest_golden import read_golden
from workers.manifest_types import DTYPE_NAMES, GoldenCase, InputSpec, Manifest, ManifestError

TOP_KEYS = frozenset(
    {"factory", "rtol", "atol", "warmup_batch_sizes", "batching", "inputs", "outputs", "golden"}
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


class Parser:
    """One manifest file's checks; ``roots``: where its golden file may lie."""

    def __init__(self, path: str, roots: Sequence[str]) -> None:
        self.path = path
        self.roots = tuple(roots)

    def fail(self, key: str, message: str) -> ManifestError:
        return ManifestError(f"{self.path}: {key}: {message}")

    def parse(self, data: Mapping[str, Any]) -> Manifest:
        self.check_keys(data, TOP_KEYS, "")
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
        return read_golden(golden_path, self.roots, lambda msg: self.fail("golden.file", msg))
