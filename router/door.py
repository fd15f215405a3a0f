"""The door: a bound on the frontend's connections, so clients cannot take poold's
descriptors.

Why: every accepted connection costs poold one descriptor, and libzmq's ipc listener
aborts the process (``Too many open files (src/ipc_listener.cpp:297)``) when an accept
finds the table full. A local user opening TCP connections to the frontend could so
kill the pool the next time pool-ctl or a replacement worker connected. Before that,
libzmq's I/O thread spins on a listener it cannot accept from.

How:

* poold raises its soft ``RLIMIT_NOFILE`` to the hard limit (``raise_nofile``) and keeps
  ``FD_RESERVE`` descriptors for itself (control, workers, lanes, state files, the HTTP
  thread); clients get at most ``max_connections`` (``connection_limit``).
* A libzmq monitor on the frontend tells us each accepted and each closed connection
  (with its descriptor). At the limit we attach a classic BPF filter that drops every
  packet to the *listening* socket: new handshakes never complete (a ZeroMQ client
  keeps retrying and connects once there is room), while established connections,
  which are sockets of their own, are untouched. We cannot simply unbind: libzmq makes
  each accepted session a child of its listener, so unbinding would drop every client.
* Connections accepted after that (the kernel's accept queue, ``BACKLOG``, filled before
  the filter went on) are served: closing them would lose the request they carry.
  Past ``limit + BACKLOG`` (the loop was slow to shut the door) each new one is shut
  down at once and libzmq closes it; that is counted (``refused``) and logged at most
  once a second, and the client's retry gets in later.
* Under ``LOW_WATER`` of the limit the filter comes off again.

The listening socket is found among our descriptors by its address (libzmq does not
expose it); a duplicate of it is kept to attach and detach the filter. An ipc frontend
has no such filter (the kernel does not run socket filters on a unix listener), so
excess connections are only closed; its directory's permissions decide who may connect.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

# Descriptors kept back for poold itself whatever the clients do: control connections,
# workers' backend connections and lanes, the spawner's pipes, state files, NVML, HTTP.
FD_RESERVE = 512
MIN_CONNECTIONS = 16
LOW_WATER = 0.9  # reopen below this fraction of the limit
BACKLOG = 64  # the accept queue: what can still arrive after the filter goes on
LOG_EVERY_S = 1.0

SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; Python's socket module has no names
SO_DETACH_FILTER = 27
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED


class DoorStats(NamedTuple):
    open: int  # connections now
    limit: int
    full: bool  # refusing new connections
    refused: int  # connections closed because they came past the limit
    accept_failed: int  # accepts that failed in libzmq (EMFILE and the like)


def raise_nofile() -> int:
    """Raise the soft descriptor limit to the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # Linux never allows more than fs.nr_open (1M by default)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return int(soft)


def connection_limit(configured: int, nofile: int) -> int:
    """``max_connections`` (0: the descriptor limit less ``FD_RESERVE``)."""
    # A small table (ulimit -n 1024) gives clients half of it, a large one all but the reserve.
    auto = max(MIN_CONNECTIONS, nofile - FD_RESERVE if nofile >= 2 * FD_RESERVE else nofile // 2)
    if configured > 0:
        if configured > auto:
            log.warning(
                "max_connections = %d leaves too few of %d descriptors; using %d",
                configured,
                nofile,
                auto,
            )
        return min(configured, auto)
    return auto


def _drop_all_program() -> bytes:
    """``struct sock_fprog`` for one instruction, ``ret #0``: drop the packet."""

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    insns = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0))  # BPF_RET | BPF_K, 0
    _drop_all_program.keep = insns  # type: ignore[attr-defined]  # the kernel copies it
    return bytes(SockFprog(1, insns))


def _addr(endpoint: str) -> tuple[int, str, int] | None:
    """(family, host, port) of a ``tcp://HOST:PORT`` endpoint libzmq reports, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, host.strip("[]"), int(port)
    return socket.AF_INET, host, int(port)


def find_listener(endpoint: str) -> socket.socket | None:
    """A duplicate of libzmq's listening socket for ``endpoint`` (its LAST_ENDPOINT)."""
    want = _addr(endpoint)
    if want is None:
        return None
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = os.dup(fd)
        except OSError:
            continue
        s = socket.socket(fileno=dup)
        try:
            here = s.getsockname()
            if (
                s.family == want[0]
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and (here[0], here[1]) == (want[1], want[2])
            ):
                return s
        except OSError:
            pass
        s.close()
    return None


class Door:
    """Counts the frontend's connections and refuses new ones at ``limit``."""

    def __init__(
        self,
        frontend: zmq.Socket[Any],
        limit: int,
        on_closed: Callable[[int], None] | None = None,
    ) -> None:
        self.limit = limit
        self.on_closed = on_closed  # told each closed connection's descriptor
        self.low = max(1, int(limit * LOW_WATER))
        self.endpoint = frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.monitor = frontend.get_monitor_socket(_EVENTS)
        self.listener = find_listener(self.endpoint)
        tcp = _addr(self.endpoint)
        # What getsockname() says for one of our accepted connections: its port, or the path.
        self.local: int | str = tcp[2] if tcp else self.endpoint.partition("://")[2]
        if self.listener is None and tcp is not None:
            log.warning(
                "frontend %s: listening socket not found; cannot refuse at the door", self.endpoint
            )
        self.open: set[int] = set()
        self.full = False
        self.refused = 0
        self.accept_failed = 0
        self._unlogged = 0
        self._logged_at = 0.0
        self._drop = _drop_all_program()

    def stats(self) -> DoorStats:
        return DoorStats(len(self.open), self.limit, self.full, self.refused, self.accept_failed)

    def handle(self) -> None:
        """Read what the monitor says; close what came past the limit; shut or open."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind, fd = event["event"], int(event["value"])
            if kind == zmq.EVENT_ACCEPTED:
                if len(self.open) >= self.limit + BACKLOG and self._shut_down(fd):
                    self.refused += 1
                    self._unlogged += 1
                self.open.add(fd)  # its DISCONNECTED comes either way
            elif kind == zmq.EVENT_DISCONNECTED:
                self.open.discard(fd)
                if self.on_closed is not None:
                    self.on_closed(fd)
            elif kind == zmq.EVENT_ACCEPT_FAILED:
                self.accept_failed += 1
                self._unlogged += 1
        self._gate()
        now = time.monotonic()
        if self._unlogged and now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning(
                "frontend full: %d connections (limit %d); closed %d past the limit "
                "(%d in all), %d accepts failed",
                len(self.open),
                self.limit,
                self._unlogged,
                self.refused,
                self.accept_failed,
            )
            self._unlogged = 0

    def _gate(self) -> None:
        if not self.full and len(self.open) >= self.limit:
            self.full = True
            self._filter(True)
            log.warning(
                "frontend %s full: %d connections (limit %d); refusing new ones until "
                "fewer than %d",
                self.endpoint,
                len(self.open),
                self.limit,
                self.low,
            )
        elif self.full and len(self.open) < self.low:
            self.full = False
            self._filter(False)
            log.info("frontend %s open again: %d connections", self.endpoint, len(self.open))

    def _filter(self, drop: bool) -> None:
        if self.listener is None:
            return
        try:
            if drop:
                self.listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, self._drop)
            else:
                self.listener.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        except OSError as exc:
            log.warning(
                "frontend: cannot %s the door filter: %s", "attach" if drop else "detach", exc
            )

    def _shut_down(self, fd: int) -> bool:
        """Shut down connection ``fd`` if it still is one of the frontend's; libzmq then
        sees end of file and closes it. The check guards against a reused number."""
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            return False
        try:
            here = s.getsockname()
            local = here[1] if isinstance(here, tuple) else here
            if local != self.local or s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return False
            s.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            s.detach()  # libzmq owns the descriptor

    def close(self) -> None:
        if self.monitor.closed:
            return
        self.monitor.close(linger=0)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
