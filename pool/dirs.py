"""Directories poold writes to or listens in: created owner-only, never re-moded.

An earlier poold chmodded the parent of every ipc socket to 0700, so
``control = "ipc:///tmp/gpu-pool.sock"`` would have taken /tmp from everyone else. A
directory poold did not create is left as it is; if it is unsafe for what poold puts
there (others may write to it, or it belongs to someone else) poold refuses to start
and says what to use instead.
"""

from __future__ import annotations

import errno
import os
import stat


class UnsafeDirectory(Exception):
    """A directory poold will not use; the message says why and what to do."""


def private_dir(path: str, what: str) -> bool:
    """Make sure ``path`` exists and only we (or root) can change what is in it.

    Creates it 0700 when missing (returns True); an existing directory is checked, never
    changed. Raises UnsafeDirectory when it is not a directory, belongs to another user,
    or group/others may write to it.
    """
    created = False
    try:
        os.makedirs(path, mode=0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.ENOSPC, errno.EACCES) or not os.path.isdir(path):
            raise UnsafeDirectory(f"{what} directory {path}: cannot create it: {exc}") from exc
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{what} directory {path} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafeDirectory(
            f"{what} directory {path} belongs to uid {st.st_uid}, not to poold's user "
            f"(uid {os.geteuid()}); use a directory of poold's own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(
            f"{what} directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}),"
            " so another user could take or replace what poold puts there; poold does not"
            " change the mode of a directory it did not create: use one of its own, such as"
            " $XDG_RUNTIME_DIR/gpu-pool or /run/gpu-pool (systemd: RuntimeDirectory=)"
        )
    return created
