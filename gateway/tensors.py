"""Tensors between the Open Inference Protocol and gpu-pool's wire: names, dtypes, bytes.

OIP names datatypes ``FP32``, ``INT64``, ...; gpu-pool's wire uses numpy/torch names. A
tensor's bytes are C-contiguous little-endian on both sides, so binary data (HTTP's binary
tensor extension, gRPC's raw contents) passes through untouched; only JSON ``data`` lists
and gRPC typed ``contents`` are converted, with numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from router import protocol as p

# OIP datatype -> gpu-pool wire dtype. OIP's UINT16/32/64 and BYTES have no wire dtype.
OIP_TO_WIRE: Final[dict[str, str]] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
WIRE_TO_OIP: Final[dict[str, str]] = {v: k for k, v in OIP_TO_WIRE.items()}


class TensorError(ValueError):
    """A tensor the gateway cannot pass on: answered as BAD_REQUEST."""


@dataclass(frozen=True)
class WireTensor:
    """One tensor in gpu-pool's wire form: dtype name, shape and raw little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def wire_dtype(datatype: object) -> str:
    if not isinstance(datatype, str) or datatype not in OIP_TO_WIRE:
        known = ", ".join(OIP_TO_WIRE)
        raise TensorError(f"datatype {str(datatype)[:32]!r} is not supported; use one of {known}")
    return OIP_TO_WIRE[datatype]


def oip_datatype(dtype: str) -> str:
    """The OIP name for a wire or contract dtype (``torch.float32`` and ``float32`` alike)."""
    name = dtype.removeprefix("torch.")
    return WIRE_TO_OIP.get(name, name.upper())


def check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or len(shape) > p.MAX_DIMS:
        raise TensorError(f"shape must be a list of at most {p.MAX_DIMS} dims")
    dims = tuple(shape)
    for d in dims:
        if type(d) is not int or d < 0:  # bool is an int subclass: not a dim
            raise TensorError(f"shape dims must be non-negative integers (got {list(shape)[:16]})")
    return dims


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return p.DTYPES[dtype] * math.prod(shape)


def _numpy_dtype(dtype: str) -> np.dtype[Any]:
    return np.dtype("<f4" if dtype == "bfloat16" else dtype).newbyteorder("<")


def _f32_to_bf16(a: np.ndarray) -> bytes:
    """Round float32 values to bfloat16 (nearest, ties to even), as torch does."""
    u = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def from_values(dtype: str, shape: tuple[int, ...], values: Any) -> WireTensor:
    """A tensor from a JSON ``data`` list (flat or nested, row-major) or typed contents."""
    try:
        a = np.asarray(values, dtype=_numpy_dtype(dtype))
    except (ValueError, TypeError, OverflowError) as exc:
        raise TensorError(f"data is not a list of {dtype} values: {exc}") from None
    count = math.prod(shape)
    if a.size != count:
        raise TensorError(f"data holds {a.size} values but shape {list(shape)} needs {count}")
    if dtype == "bfloat16":
        return WireTensor(dtype, shape, _f32_to_bf16(a))
    return WireTensor(dtype, shape, np.ascontiguousarray(a.reshape(-1)).tobytes())


def from_bytes(dtype: str, shape: tuple[int, ...], data: bytes | memoryview) -> WireTensor:
    want = nbytes(dtype, shape)
    if len(data) != want:
        raise TensorError(f"{len(data)} bytes of data but {dtype} {list(shape)} needs {want} bytes")
    return WireTensor(dtype, shape, data)


def to_array(t: WireTensor) -> np.ndarray:
    """The tensor as a numpy array (bfloat16 widened exactly to float32, as JSON wants)."""
    if t.dtype == "bfloat16":
        u = np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(t.shape)
    return np.frombuffer(t.data, dtype=_numpy_dtype(t.dtype)).reshape(t.shape)


def to_list(t: WireTensor) -> list[Any]:
    """Row-major flat list of values for JSON (NaN and infinity are written as
    ``NaN``/``Infinity``, which Python's and tritonclient's JSON readers accept)."""
    a = to_array(t).reshape(-1)
    values: list[Any] = a.tolist()
    return values
