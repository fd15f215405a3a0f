"""The manifest's records (what a manifest says once read) and its one error.

Standard library and numpy only, so both the worker and the supervisor can use them;
``workers.manifest`` documents the file format and re-exports these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pool.contract import DTYPES

# The names both the manifest and the wire use for tensor element types.
DTYPE_NAMES: frozenset[str] = DTYPES


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
