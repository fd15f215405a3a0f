"""The host's files as the core's ``HostFiles`` port sees them (``pool.ports``).

A standby's preload is decided from a model file's size against the memory the host
has available, a take checks that the standby's sandbox can reach the new version's
file, and an operation hashes the model file it deploys (on a thread: a big file must
not stall routing). Those are reads of the host, so the core asks for them through this
port and a test can hand it a fake host (``tests/test_standby_preload.py``).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

from pool.state import file_digest

# Shared by every LocalFiles: two hashes at once at most, whatever asks.
_digests = ThreadPoolExecutor(max_workers=2, thread_name_prefix="digest")


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

    def digest(self, path: str, done: list[int]) -> Future[str]:
        return _digests.submit(file_digest, path, done)


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
