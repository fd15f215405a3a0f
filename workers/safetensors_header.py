"""The safetensors header: read and checked before any tensor byte is.

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``name ->
{"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"`` of strings),
then the data region, which the tensors' ``[begin, end)`` offsets must cover exactly,
with no gap and no overlap. ``read_header`` checks all of that, so a bad file fails with
one clear ``SafetensorsError`` and never half-loads (``workers.weights`` reads the data).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "Header",
    "SafetensorsError",
    "TensorSpec",
    "parse_header",
    "read_header",
]

# The same bound as the safetensors library: a header is names, dtypes, shapes, offsets.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names, as safetensors.torch maps them. Sub-byte formats (F4, F6_*)
# pack several values per byte and change the shape; they are refused.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


class SafetensorsError(ValueError):
    """The file is not a well-formed safetensors file (or changed while being read)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the header; ``begin``/``end`` are offsets in the data region."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated header: tensors sorted by offset, covering the data region exactly."""

    tensors: tuple[TensorSpec, ...]
    data_start: int  # file offset of the data region: 8 + header length
    data_size: int
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str) -> Header:
    """Parse and validate the header of ``path``; ``SafetensorsError`` when it is bad."""
    fd = _open(path)
    try:
        return _read_header(fd)
    finally:
        os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SafetensorsError(f"cannot open: {e.strerror or e}") from e


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        part = os.pread(fd, size - len(out), offset + len(out))
        if not part:
            break
        out += part
    return bytes(out)


def _read_header(fd: int) -> Header:
    file_size = os.fstat(fd).st_size
    if file_size < 8:
        raise SafetensorsError(f"file is {file_size} bytes, too short for the 8-byte header length")
    head = _pread_exact(fd, 8, 0)
    if len(head) != 8:
        raise SafetensorsError("file ended inside the header (it changed while being read)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > file_size:
        raise SafetensorsError(
            f"header length {n} runs past the end of the file ({file_size} bytes)"
        )
    raw = _pread_exact(fd, n, 8)
    if len(raw) != n:
        raise SafetensorsError("file ended inside the header (it changed while being read)")
    return parse_header(raw, 8 + n, file_size - 8 - n)


def parse_header(raw: bytes, data_start: int, data_size: int) -> Header:
    """Validate the JSON header ``raw`` for a data region of ``data_size`` bytes that
    starts at file offset ``data_start``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"header is not UTF-8: {e}") from e
    if not text.startswith("{"):
        raise SafetensorsError("header is not a JSON object")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"header is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError('"__metadata__" must map strings to strings')
    specs = sorted(
        (_entry(name, entry) for name, entry in doc.items()), key=lambda s: (s.begin, s.end)
    )
    # Sorted by offset, each tensor must start where the previous one ended: the data
    # region is covered exactly once, with no gap, overlap or trailing bytes.
    pos, prev = 0, None
    for s in specs:
        if s.end > data_size:
            raise SafetensorsError(
                f"tensor {s.name!r}: data_offsets [{s.begin}, {s.end}] run past the end of "
                f"the data ({data_size} bytes): the file is truncated or the offsets wrong"
            )
        if s.begin < pos:
            assert prev is not None
            raise SafetensorsError(
                f"tensor {s.name!r}: data_offsets [{s.begin}, {s.end}] overlap tensor "
                f"{prev.name!r} [{prev.begin}, {prev.end}]"
            )
        if s.begin > pos:
            raise SafetensorsError(
                f"tensor {s.name!r}: data_offsets [{s.begin}, {s.end}] leave a gap of "
                f"{s.begin - pos} bytes before it"
            )
        pos, prev = s.end, s
    if pos != data_size:
        raise SafetensorsError(
            f"{data_size - pos} bytes after the last tensor: the tensors cover {pos} of the "
            f"{data_size} data bytes"
        )
    return Header(tuple(specs), data_start, data_size, metadata)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SafetensorsError(f"header has the key {key!r} twice")
        out[key] = value
    return out


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(name: str, entry: object) -> TensorSpec:
    if not isinstance(entry, dict):
        raise SafetensorsError(f"tensor {name!r}: entry is not a JSON object")
    if set(entry) != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - set(entry)), sorted(set(entry) - _ENTRY_KEYS)
        raise SafetensorsError(
            f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(extra)}" if extra else "")
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(
            f"tensor {name!r}: unsupported dtype {dtype!r}; known: {', '.join(DTYPES)}"
        )
    # Dimensions are int64 in torch, even those of an empty tensor.
    if not isinstance(shape, list) or not all(_is_count(d) and d < 2**63 for d in shape):
        raise SafetensorsError(
            f"tensor {name!r}: shape must be a list of integers in [0, 2**63), got {shape!r}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise SafetensorsError(
            f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r}"
        )
    begin, end = offsets
    if end < begin:
        raise SafetensorsError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] end before they start"
        )
    expected = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != expected:
        raise SafetensorsError(
            f"tensor {name!r}: {dtype} x {shape} is {expected} bytes but data_offsets "
            f"[{begin}, {end}] hold {end - begin}"
        )
    return TensorSpec(name, DTYPES[dtype], tuple(shape), begin, end)


# ------------------------------------------------------------------------- streaming
