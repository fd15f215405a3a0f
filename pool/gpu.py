"""GPU memory through NVML only: the supervisor must never create a CUDA context."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Gpu:
    """Lazy NVML access; every method returns None when NVML or the device is absent."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def _lib(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # no driver, no library: a CPU-only host
                log.debug("NVML unavailable: %s", exc)
        return self._nvml

    def count(self) -> int:
        nv = self._lib()
        if nv is None:
            return 0
        try:
            return int(nv.nvmlDeviceGetCount())
        except Exception:
            return 0

    def _handle(self, index: int) -> Any:
        nv = self._lib()
        if nv is None:
            return None
        try:
            return nv.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None

    def memory(self, index: int) -> tuple[int, int, int] | None:
        """(used, free, total) bytes of one device."""
        h = self._handle(index)
        if h is None:
            return None
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(h)
            return int(info.used), int(info.free), int(info.total)
        except Exception:
            return None

    def utilization(self, index: int) -> float | None:
        """Fraction of the last sample period a kernel ran on the device (NVML, 0..1)."""
        h = self._handle(index)
        if h is None:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu) / 100.0
        except Exception:
            return None

    def process_bytes(self, index: int) -> dict[int, int] | None:
        """GPU bytes used by each process with a context on the device, by pid."""
        h = self._handle(index)
        if h is None:
            return None
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(h)
        except Exception:
            return None
        out: dict[int, int] = {}
        for pr in procs:
            used = pr.usedGpuMemory
            out[int(pr.pid)] = int(used) if isinstance(used, int) else 0
        return out


def device_index(device: str) -> int | None:
    """``"cuda:3"`` -> 3; ``"cpu"`` -> None."""
    if not device.startswith("cuda"):
        return None
    _, _, idx = device.partition(":")
    return int(idx) if idx.isdigit() else 0
