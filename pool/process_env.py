"""The process poold runs as: a subreaper, private directories, short socket paths,
the metrics token."""

from __future__ import annotations

import ctypes
import logging
import tempfile

from pool.config import PoolConfig
from pool.dirs import private_dir
from pool.http import read_token_file

log = logging.getLogger("poold")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of a dead spawner become our children, so our reaper can reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_CHILD_SUBREAPER) unavailable")


def metrics_token(pool: PoolConfig) -> str:
    """The bearer token /metrics requires ("" = none), from pool.metrics_token_file."""
    if not pool.metrics_token_file:
        return ""
    try:
        return read_token_file(pool.metrics_token_file)
    except ValueError as exc:
        raise SystemExit(f"pool.metrics_token_file: {exc}") from exc


def owner_only_dir(path: str, what: str = "state") -> None:
    """See pool.dirs: created 0700 if missing, refused if unsafe, never re-moded."""
    private_dir(path, what)


# An ipc:// path is limited to 107 bytes (sun_path); ours are rundir + "/backend.sock".
IPC_DIR_MAX = 80


def short_tmp() -> str | None:
    """Where poold's private socket directory goes: $TMPDIR unless its path is too long
    for ipc sockets under it, then /tmp."""
    return None if len(tempfile.gettempdir().encode()) <= IPC_DIR_MAX - 20 else "/tmp"
