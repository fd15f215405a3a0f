"""The host's files as the core's ``HostFiles`` port sees them (``pool.ports``).

A standby's preload is decided from a model file's size against the memory the host
has available, and a take checks that the standby's sandbox can reach the new version's
file. Those are reads of the host, so the core asks for them through this port and a
test hands it a fake host (``tests/test_core_standby.py``).
"""

from __future__ import annotations

import os


class LocalFiles:
    """The real host: ``os`` and ``/proc/meminfo``."""

    def __init__(self, meminfo: str = "/proc/meminfo") -> None:
        self.meminfo = meminfo

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def mem_available(self) -> int | None:
        return available_ram(self.meminfo)

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)


def available_ram(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's MemAvailable in bytes; None where it cannot be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
