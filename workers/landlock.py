"""Landlock through its three system calls (ctypes, no extension to build).

A ruleset names the rights it *handles*; once the calling thread restricts itself with
it, every handled right is denied except where a rule grants it. Rights a kernel does
not know are left out of the ruleset (they stay allowed), so one binary works from the
first ABI up. What each ABI adds (``Documentation/userspace-api/landlock.rst``):

    ABI 1  Linux 5.13  files and directories: read, write, execute, make, remove
    ABI 2  Linux 5.19  REFER: linking or renaming a file into another directory
    ABI 3  Linux 6.2   TRUNCATE: truncate(2), ftruncate(2), O_TRUNC
    ABI 4  Linux 6.7   TCP bind(2) and connect(2), by port
    ABI 5  Linux 6.10  IOCTL_DEV: ioctl(2) on character and block devices
    ABI 6  Linux 6.12  scoping: no connect to an abstract unix socket, and no signal
                       to a process, outside the domain
    ABI 7  Linux 6.15  audit logging flags (nothing more is restricted)
    ABI 8  Linux 7.0   RESTRICT_SELF_TSYNC: restrict every thread of the process at once

The restriction holds for the calling thread and every thread or process it starts
afterwards; before ABI 8, threads that already exist stay outside (``workers.seccomp``
covers the network for all of them). From ABI 8 on, ``restrict`` asks for all threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

# The generic syscall table: the same numbers on x86_64, aarch64, riscv64 and the rest.
SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1
RESTRICT_SELF_TSYNC = 1 << 3  # ABI 8

FS_ABI1 = (1 << 13) - 1
# Rights that apply to a file itself; a rule on a non-directory may hold only these.
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ = FS_READ_FILE | FS_READ_DIR
WRITE = (
    READ
    | FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_SYM
    | FS_REFER
    | FS_TRUNCATE
)
DEVICE = FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # packed in the kernel's header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class LandlockError(OSError):
    """A Landlock call failed where the kernel claimed support."""


def _syscall(*args: object) -> int:
    ret = int(_libc.syscall(*args))
    if ret < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, os.strerror(err))
    return ret


def abi_version() -> tuple[int, str]:
    """The kernel's Landlock ABI (0: none) and, when 0, why."""
    try:
        return _syscall(
            ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
            ctypes.c_uint32(CREATE_RULESET_VERSION),
        ), ""  # fmt: skip
    except LandlockError as exc:
        if exc.errno == errno.ENOSYS:
            return 0, "the kernel has no Landlock (Linux 5.13+ with CONFIG_SECURITY_LANDLOCK)"
        if exc.errno == errno.EOPNOTSUPP:
            return 0, "Landlock is built in but not enabled (boot with lsm=...,landlock)"
        return 0, f"Landlock unavailable: {exc.strerror}"


def handled_fs(abi: int) -> int:
    rights = FS_ABI1 if abi >= 1 else 0
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def handled_net(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scopes(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def set_no_new_privs() -> None:
    """No execve can gain privileges from now on (setuid, file capabilities); both
    Landlock and seccomp require it of an unprivileged process."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"PR_SET_NO_NEW_PRIVS: {os.strerror(err)}")


@dataclass(frozen=True)
class Grant:
    """``rights`` (the READ/WRITE/DEVICE masks above) on a path and everything under it."""

    path: str
    rights: int


@dataclass
class Restriction:
    """What one ``restrict`` applied."""

    abi: int
    fs: int  # handled filesystem rights
    net: int  # handled network rights (all TCP bind/connect denied: no port rules)
    scoped: int
    all_threads: bool  # every thread of the process (ABI 8), not only the calling one
    granted: list[str] = field(default_factory=list)  # paths given a rule
    missing: list[str] = field(default_factory=list)  # paths that did not exist


def restrict(abi: int, grants: Iterable[Grant]) -> Restriction:
    """Restrict the calling thread (and what it starts later) to ``grants``: every
    other file is out of reach, and so are TCP and the IPC scopes where ``abi`` has
    them. Requires no_new_privs. Raises LandlockError when the kernel refuses."""
    fs, net, scoped = handled_fs(abi), handled_net(abi), scopes(abi)
    attr = _RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # the struct as this ABI knows it
    ruleset = _syscall(
        ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )  # fmt: skip
    flags = RESTRICT_SELF_TSYNC if abi >= 8 else 0
    done = Restriction(abi, fs, net, scoped, bool(flags))
    try:
        for grant in grants:
            try:
                fd = os.open(grant.path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                done.missing.append(grant.path)
                continue
            try:
                rights = grant.rights & fs
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= FS_FILE_RIGHTS
                rule = _PathBeneath(rights, fd)
                _syscall(
                    ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(ruleset),
                    ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0),
                )  # fmt: skip
                done.granted.append(grant.path)
            finally:
                os.close(fd)
        _syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(flags))
    finally:
        os.close(ruleset)
    return done
