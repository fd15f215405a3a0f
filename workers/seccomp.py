"""A seccomp filter that takes the network away from every thread of the process.

The worker reaches poold over unix sockets only, so the filter lets ``socket(2)``
create AF_UNIX sockets and refuses every other family (TCP and UDP over IPv4 and IPv6,
packet sockets, ...) with EACCES. It also refuses ``io_uring_setup`` (io_uring can
create and connect sockets without the ``socket`` call being seen) and any system call
of another ABI (x32, or 32-bit ``int 0x80`` on x86_64, where ``socketcall`` would
bypass the check).

Unlike Landlock before ABI 8, ``SECCOMP_FILTER_FLAG_TSYNC`` installs it on every
thread at once, so the threads started before the sandbox (libzmq's I/O threads, the
lifeline watch, CUDA's) cannot open a network connection either.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
from dataclasses import dataclass

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000
X32_BIT = 0x40000000
IO_URING_SETUP = 425  # generic table: every architecture

# BPF opcodes (linux/filter.h)
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
RET_K = 0x06
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0 = 0, 4, 16  # struct seccomp_data, little-endian


@dataclass(frozen=True)
class Arch:
    audit: int  # AUDIT_ARCH_*
    seccomp_nr: int
    socket_nr: int


ARCHES = {
    "x86_64": Arch(0xC000003E, 317, 41),
    "aarch64": Arch(0xC00000B7, 277, 198),
}


class _Insn(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def arch() -> Arch | None:
    """This machine's numbers, or None where the filter has not been written for it."""
    return ARCHES.get(platform.machine())


def program(a: Arch, deny_errno: int = errno.EACCES) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k); jumps count instructions skipped."""
    deny = RET_ERRNO | deny_errno
    return [
        (LD_W_ABS, 0, 0, OFFSET_ARCH),
        (JEQ_K, 1, 0, a.audit),  # 1: native ABI -> 3
        (RET_K, 0, 0, deny),  # 2
        (LD_W_ABS, 0, 0, OFFSET_NR),  # 3
        (JGE_K, 0, 1, X32_BIT),  # 4: x32 -> 5, else 6
        (RET_K, 0, 0, deny),  # 5
        (JEQ_K, 0, 1, IO_URING_SETUP),  # 6 -> 7, else 8
        (RET_K, 0, 0, deny),  # 7
        (JEQ_K, 0, 3, a.socket_nr),  # 8: socket -> 9, else 12
        (LD_W_ABS, 0, 0, OFFSET_ARG0),  # 9: the address family
        (JEQ_K, 1, 0, socket.AF_UNIX),  # 10: -> 12
        (RET_K, 0, 0, deny),  # 11
        (RET_K, 0, 0, RET_ALLOW),  # 12
    ]


def deny_network() -> None:
    """Install the filter on all threads; requires no_new_privs. Raises OSError."""
    a = arch()
    if a is None:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {platform.machine()}")
    insns = program(a)
    table = (_Insn * len(insns))(*(_Insn(*i) for i in insns))
    prog = _Prog(len(insns), table)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(
        ctypes.c_long(a.seccomp_nr),
        ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
        ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(prog),
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")
    if ret > 0:  # TSYNC names a thread that could not take the filter
        raise OSError(errno.EAGAIN, f"seccomp: thread {ret} could not be synchronised")
