"""Process probes for the stress run: one process's RSS, descriptors and threads, its
children and zombies, and who holds ``/dev/nvidia*`` (``Leftovers`` turns these into
zombies and orphans).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import psutil


def proc_stats(pid: int | None) -> tuple[int | None, int | None, int | None]:
    """(RSS bytes, open fds, threads) of one process; Nones when it cannot be read."""
    if pid is None:
        return None, None, None
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            return int(p.memory_info().rss), int(p.num_fds()), int(p.num_threads())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, None, None


def child_stats(pid: int | None) -> tuple[int | None, set[int]]:
    """(number of direct children, pids of the zombies among them)."""
    if pid is None:
        return None, set()
    try:
        kids = psutil.Process(pid).children()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None, set()
    zombies = set()
    for k in kids:
        try:
            if k.status() == psutil.STATUS_ZOMBIE:
                zombies.add(k.pid)
        except psutil.NoSuchProcess:
            pass
    return len(kids), zombies


def nvidia_holders() -> set[int]:
    """Pids with an open ``/dev/nvidia*`` descriptor; processes we may not read are skipped.

    (psutil's ``open_files()`` lists regular files only, so the fd links are read here.)
    """
    out: set[int] = set()
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}").startswith("/dev/nvidia"):
                    out.add(pid)
                    break
            except OSError:
                continue
    return out


class Leftovers:
    """Finds zombies and orphans: every worker pid ever seen is remembered (with its
    start time, so a reused pid is not mistaken for it); one still running after it left
    the pool is an orphan. Anything else holding ``/dev/nvidia*`` that is not a live
    worker, an expected process or there before the run is an orphan too."""

    def __init__(self, expected: Iterable[int]) -> None:
        self.baseline = nvidia_holders()
        self.expected = set(expected) | {os.getpid()}
        self.seen: dict[int, psutil.Process] = {}

    def remember(self, pids: Iterable[int | None]) -> None:
        for pid in pids:
            if pid is not None and pid not in self.seen:
                try:
                    self.seen[pid] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    pass

    def check(self, live: set[int], expected: Iterable[int] = ()) -> tuple[set[int], set[int]]:
        """(zombies, orphans) among the processes that are not ``live`` workers."""
        zombies, orphans = set(), set()
        for pid, proc in list(self.seen.items()):
            if pid in live:
                continue
            try:
                running = proc.is_running()
                status = proc.status() if running else None
            except psutil.NoSuchProcess:
                running, status = False, None
            if not running:
                del self.seen[pid]
            elif status == psutil.STATUS_ZOMBIE:
                zombies.add(pid)
            else:
                orphans.add(pid)
        skip = live | self.expected | set(expected) | self.baseline
        orphans |= nvidia_holders() - skip
        return zombies, orphans
