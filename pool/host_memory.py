"""Huge pages for the host memory a model load allocates, through glibc's tunable.

Loading a model allocates its tensors on the host first (``torch.jit.load`` reads every
storage into a fresh buffer, then copies it to the device; a CPU worker keeps them).
glibc serves buffers that large with a fresh ``mmap``, and touching it costs a page fault
per 4 KiB: on a lent H200, ``torch.jit.load`` of 768 MiB took 0.60-0.74 s with
``map_location="cuda"``, and 0.34-0.39 s with ``glibc.malloc.hugetlb=1``, which
asks the kernel for transparent huge pages on those mappings (2 MiB per fault). The
tunable is read when a process starts, so poold sets it for the spawner, and every
worker and standby forked from it inherits it.

It is left alone when the operator set ``glibc.malloc.hugetlb`` themselves, when
``GPU_POOL_HOST_HUGEPAGES=0``, when glibc is older than 2.35 (no such tunable), and when
the kernel's transparent huge pages are ``never``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["HUGEPAGES_ENV", "with_host_hugepages"]

HUGEPAGES_ENV = "GPU_POOL_HOST_HUGEPAGES"
TUNABLES = "GLIBC_TUNABLES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # glibc.malloc.hugetlb is new in 2.35


def glibc_version() -> tuple[int, int] | None:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.39"
    except (ValueError, OSError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    try:
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def thp_possible(path: str = THP_ENABLED) -> bool:
    """False only when the kernel says ``[never]``; a kernel without THP has no file."""
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def with_host_hugepages(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES`` where it helps."""
    out = dict(env)
    if out.get(HUGEPAGES_ENV, "1") == "0":
        return out
    current = out.get(TUNABLES, "")
    if "glibc.malloc.hugetlb" in current:
        return out  # the operator's choice
    version = glibc_version()
    if version is None or version < MIN_GLIBC or not thp_possible():
        return out
    out[TUNABLES] = f"{current}:glibc.malloc.hugetlb=1" if current else "glibc.malloc.hugetlb=1"
    return out
