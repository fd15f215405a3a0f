"""poold's private run directory (sockets, the gateways' keys) and the stale ones.

Each poold makes its own ``gpu-pool-XXXXXXXX`` with mkdtemp and removes it on exit. A
SIGKILLed poold cannot, so at start poold removes the ones such pooldes left behind:
a directory is stale only when all of these hold, so that another user's, or another
running poold's, is never touched:

- it is a real directory (not a symlink) named ``gpu-pool-*`` and belongs to our uid;
- it holds ``poold.pid`` (written right after mkdtemp; a directory without one may be
  a poold that is starting this instant, or not ours at all: left alone);
- that pid is dead, or is a process started after the pid file was written (the pid was
  reused by an unrelated process).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile

import psutil

log = logging.getLogger(__name__)

PREFIX = "gpu-pool-"
PID_FILE = "poold.pid"
# A process whose start time is this much after the pid file's mtime is not its writer
# (clock ticks and file-time granularity differ: a little slack).
REUSED_AFTER_S = 2.0


def make_rundir(parent: str | None) -> str:
    """A fresh private directory in ``parent`` (None: $TMPDIR), with our pid file."""
    path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
    with open(os.path.join(path, PID_FILE), "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    return path


def clean_stale(parent: str | None) -> list[str]:
    """Remove the stale run directories in ``parent`` (None: $TMPDIR); returns them."""
    base = parent or tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith(PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(base, name)
        owner = stale_owner(path)
        if owner is None:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(path)
            log.info("removed stale run directory %s (its poold, pid %d, is gone)", path, owner)
    return removed


def stale_owner(path: str) -> int | None:
    """The dead poold's pid if ``path`` is a stale run directory of ours, else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return None
        pid_path = os.path.join(path, PID_FILE)
        pst = os.lstat(pid_path)
        if not stat.S_ISREG(pst.st_mode) or pst.st_uid != os.geteuid():
            return None
        with open(pid_path, encoding="ascii") as f:
            pid = int(f.read(32).strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return pid
    except psutil.Error:
        return None  # alive, and not ours to inspect: not stale
    return pid if started > pst.st_mtime + REUSED_AFTER_S else None
