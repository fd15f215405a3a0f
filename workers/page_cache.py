"""Reading a model file through the page cache where it can be counted.

The loaders that take a file in one call (TorchScript, torch.export, safetensors' mmap
on the CPU) cannot report progress; ``read_through`` reads the file first, counting, so
their own read comes from the page cache, and skips that when ``resident`` says every
page is there already. ``workers.weights`` re-exports both.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from workers.safetensors_header import _open


def read_through(path: str, progress: Callable[[int], None], chunk_bytes: int = 1 << 20) -> None:
    """Read ``path`` once, ``chunk_bytes`` at a time into one reused buffer, calling
    ``progress`` per chunk: for loaders that take the file in one call (TorchScript,
    torch.export, safetensors' mmap on the CPU), the disk reads then happen here, where
    they can be counted, and the loader reads from the page cache."""
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        if resident(fd, size):
            # Nothing to wait for on a disk: count the chunks without copying the file
            # once more (for 768 MiB of TorchScript, tens of ms before the load).
            for lo in range(0, size, chunk_bytes):
                progress(min(chunk_bytes, size - lo))
            return
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        buf = memoryview(bytearray(min(chunk_bytes, max(size, 1))))
        offset = 0
        while offset < size:
            n = os.preadv(fd, [buf], offset)
            if n == 0:
                break  # shorter than fstat said: the loader reports a truncated file
            offset += n
            progress(n)
    finally:
        os.close(fd)


def resident(fd: int, size: int) -> bool:
    """Whether every page of the open file ``fd`` is in the page cache (``mincore`` on
    a mapping of it; False where that cannot be asked)."""
    if size == 0:
        return True
    libc = _libc()
    if libc is None:
        return False
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return False
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            return False
        return bool((np.frombuffer(memoryview(vec).cast("B"), dtype=np.uint8) & 1).all())
    finally:
        libc.munmap(ctypes.c_void_p(addr), size)


def _libc() -> Any:
    global _LIBC
    if _LIBC is False:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_long]  # fmt: skip
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC


_LIBC: Any = False  # not looked up yet
