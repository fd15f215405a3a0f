"""One row per update cycle (``Sample``), its CSV file, and the arithmetic the verdict
uses on the rows (percentiles, least-squares slope).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

MiB = 1 << 20


@dataclass
class Sample:
    """One row of samples.csv: the state of things right after one update cycle."""

    cycle: int
    t_s: float  # since the first cycle began
    action: str  # upgrade | rollback | swap
    strategy: str  # what the pool chose (auto resolves), "in-process" for swaps
    version: str  # the version this cycle moved to
    committed: bool
    elapsed_s: float | None  # the upgrade's own elapsed_s (unload + load for swaps)
    call_s: float | None  # wall time of the command as the caller saw it (digest included)
    sample_s: float  # wall time this script spent sampling after the command
    bytes_freed: int | None  # sum over devices, from the upgrade result
    device_used: int | None  # NVML used bytes after the cycle (None on CPU)
    device_retired: int | None  # NVML used bytes at the moment the old copy was gone
    residue: int | None  # device_retired - baseline - bytes of the serving copy
    workers_gpu_bytes: int | None  # the live workers' GPU bytes, summed
    workers: int  # live workers (1 for the in-process server)
    rss: int | None  # poold's (in-process: the server's) resident set
    fds: int | None
    threads: int | None
    children: int | None  # poold's direct children (in-process: the server's)
    spawner_children: int | None
    zombies: int
    orphans: int
    requests: int  # answered during this cycle
    failed_total: int  # failed requests since the start
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None  # the slowest of them: in drain-first, the wait through the gap
    error: str = ""


COLUMNS = [f.name for f in fields(Sample)]
_INT = {"cycle", "bytes_freed", "device_used", "device_retired", "residue",
        "workers_gpu_bytes", "workers", "rss", "fds", "threads", "children",
        "spawner_children", "zombies", "orphans", "requests", "failed_total"}
_FLOAT = {"t_s", "elapsed_s", "call_s", "sample_s", "p50_ms", "p99_ms", "max_ms"}


def write_csv(path: str, samples: Sequence[Sample]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for s in samples:
            w.writerow(["" if v is None else v for v in asdict(s).values()])


def read_csv(path: str) -> list[Sample]:
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            vals: dict[str, Any] = {}
            for k in COLUMNS:
                raw = row.get(k, "")
                if k in _INT:
                    vals[k] = int(float(raw)) if raw else None
                elif k in _FLOAT:
                    vals[k] = float(raw) if raw else None
                elif k == "committed":
                    vals[k] = raw == "True"
                else:
                    vals[k] = raw
            out.append(Sample(**vals))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0.0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    dx = x - x.mean()
    den = float((dx * dx).sum())
    return float((dx * (y - y.mean())).sum() / den) if den else 0.0
