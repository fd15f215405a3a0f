"""Reading a manifest's golden file: where it may lie, and its cases.

The golden file is read by the worker, so a manifest could otherwise make it open any
file poold's user can read (and tell in its error whether it exists): its realpath must
lie inside one of the given roots, checked before it is opened. It is an ``.npz`` read
with ``allow_pickle=False``; case ``i`` is ``case{i}_in0, ...`` and ``case{i}_out0,
...``, numbered from 0 without gaps, and any other array name is an error.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from workers.manifest_types import GoldenCase, ManifestError

_GOLDEN_NAME = re.compile(r"case(\d+)_(in|out)(\d+)")


def read_golden(
    golden_path: str, roots: Sequence[str], fail: Callable[[str], ManifestError]
) -> tuple[GoldenCase, ...]:
    """The cases in the ``.npz`` at ``golden_path``, which must resolve inside one of
    ``roots``; ``fail(message)`` makes the error raised for anything wrong."""
    # Checked before the file is opened, on realpaths (a symlink inside a root that
    # points out of it is outside): nothing is read, or told, about such a path.
    real = os.path.realpath(golden_path)
    if not any(inside(real, os.path.realpath(root)) for root in roots):
        shown_path = os.path.normpath(golden_path)
        via = "" if real == shown_path else f" (resolves to {real})"
        shown = ", ".join(roots) or "(none)"
        raise fail(f"{shown_path}{via} is outside the model roots: {shown}")
    try:
        # Our own handle: np.load leaks the one it opens when the zip is bad.
        with open(golden_path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive of named arrays")
            with npz:
                arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError as e:
        raise fail(f"{golden_path}: no such file") from e
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        # ValueError is also what allow_pickle=False raises for object arrays
        raise fail(f"{golden_path}: cannot read .npz: {e}") from e
    return golden_cases(arrays, lambda msg: fail(f"{golden_path}: {msg}"))


def inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def golden_cases(
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
