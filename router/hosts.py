"""The hosts a spreading client talks to: who they are, and whether to trust them now.

``Client([ep1, ep2, ...])`` keeps one :class:`Host` per address. A ``tcp://NAME:PORT``
entry whose NAME is not an IP literal is resolved to every address it has (a Kubernetes
headless Service answers with one A record per ready pod) and re-resolved every
``refresh_s``, so pods that come and go join and leave the set.

A host's trust is a small state machine (``TRANSITIONS`` below)::

    CONNECTING --handshake--> UP --failure--> DOWN --back-off over--> PROBING
         |                     ^                ^                        |
         +------failure--------|----------------+-------failure----------+
                               +--------------- success -----------------+

A failure (no reply in time, the connection dropped under a request, a CURVE handshake
refused, ``SHUTTING_DOWN``) puts the host DOWN for a back-off that doubles with every
failure in a row (``base_s`` .. ``max_s``). After it, the host is PROBING: it gets one
request; an answer makes it UP again, a failure sends it back DOWN for longer.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

# (host name, port) -> the addresses it resolves to; injectable so tests need no DNS.
Resolver = Callable[[str, int], list[str]]

_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class HostState(StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    PROBING = "probing"


TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    HostState.CONNECTING: frozenset({HostState.UP, HostState.DOWN}),
    HostState.UP: frozenset({HostState.DOWN}),
    HostState.DOWN: frozenset({HostState.PROBING}),
    HostState.PROBING: frozenset({HostState.UP, HostState.DOWN}),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.max_s, self.base_s * 2 ** max(0, failures - 1)))


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class SocketOptions:
    """What every per-host REQ socket is opened with."""

    curve_server_key: bytes | None = None
    curve_keys: tuple[bytes, bytes] | None = None
    # ZMTP heartbeats: a host that vanishes from the network (no RST ever comes) shows up
    # as a dropped connection within heartbeat_timeout_s instead of at the deadline.
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 3.0


class Host:
    """One address: its REQ socket, that socket's monitor, and its trust state."""

    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context[Any],
        opts: SocketOptions,
        backoff: Backoff,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.ctx = ctx
        self.opts = opts
        self.backoff = backoff
        self.clock = clock
        self.state = HostState.CONNECTING
        self.connected = False  # a completed handshake on the current socket
        self.failures = 0  # in a row
        self.down_until = 0.0
        self.last_error = ""
        self.sock: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.open()

    # ------------------------------------------------------------------ state
    def move(self, new: HostState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.endpoint}: {self.state.value} -> {new.value}")
        self.state = new

    def fail(self, reason: str) -> None:
        """A failure: DOWN for the next back-off step, with a fresh socket (a REQ socket
        whose request went unanswered can never send again)."""
        self.failures += 1
        self.last_error = reason
        self.down_until = self.clock() + self.backoff.delay(self.failures)
        if self.state is not HostState.DOWN:
            self.move(HostState.DOWN)
        self.reopen()

    def succeed(self) -> None:
        self.failures = 0
        self.last_error = ""
        if self.state in (HostState.CONNECTING, HostState.PROBING):
            self.move(HostState.UP)

    def tick(self) -> None:
        """Apply what happened meanwhile: monitor events and an expired back-off."""
        for event in self.events():
            if event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                if self.state is HostState.CONNECTING:
                    self.move(HostState.UP)
            elif event & zmq.EVENT_DISCONNECTED:
                self.connected = False
                if self.state in (HostState.UP, HostState.PROBING):
                    self.fail("connection dropped")
                    break  # the rest came from the socket fail() replaced
            elif event & _HANDSHAKE_FAILED:
                self.connected = False
                if self.state is not HostState.DOWN:
                    self.fail("handshake refused (CURVE keys?)")
                    break
        if self.state is HostState.DOWN and self.clock() >= self.down_until:
            self.move(HostState.PROBING)

    @property
    def eligible(self) -> bool:
        return self.connected and self.state in (HostState.UP, HostState.PROBING)

    # ---------------------------------------------------------------- sockets
    def open(self) -> None:
        s = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        # Queue only on a finished handshake: a send to a host that is not there fails at
        # once (zmq.Again) instead of waiting in a pipe for a connection that never comes.
        s.setsockopt(zmq.IMMEDIATE, 1)
        s.setsockopt(zmq.HEARTBEAT_IVL, int(self.opts.heartbeat_s * 1000))
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.opts.heartbeat_timeout_s * 1000))
        if self.opts.curve_server_key is not None and self.opts.curve_keys is not None:
            s.curve_serverkey = self.opts.curve_server_key
            s.curve_publickey, s.curve_secretkey = self.opts.curve_keys
        self.monitor = s.get_monitor_socket(_EVENTS)
        s.connect(self.endpoint)
        self.sock = s
        self.connected = False

    def reopen(self) -> None:
        self.close()
        self.open()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close(linger=0)
            self.sock = None
        if self.monitor is not None:
            self.monitor.close(linger=0)
            self.monitor = None

    def events(self) -> list[int]:
        out: list[int] = []
        while self.monitor is not None:
            try:
                out.append(int(recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]))
            except zmq.Again:
                break
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "state": self.state.value,
            "connected": self.connected,
            "failures": self.failures,
            "last_error": self.last_error,
        }


# ------------------------------------------------------------------------ resolution
def split_tcp(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of ``tcp://host:port`` when host is a name to resolve, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit() or not host or host == "*":
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None  # already an address
    except ValueError:
        return host, int(port)


def getaddrinfo_resolver(name: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    addresses = []
    for family, _type, _proto, _canon, sockaddr in infos:
        ip = str(sockaddr[0])
        addresses.append(f"[{ip}]" if family == socket.AF_INET6 else ip)
    return sorted(set(addresses))


def expand(endpoints: Sequence[str], resolve: Resolver) -> tuple[list[str], list[str]]:
    """Every concrete endpoint the entries stand for, and the names that did not resolve."""
    out: list[str] = []
    unresolved: list[str] = []
    for ep in endpoints:
        named = split_tcp(ep)
        if named is None:
            out.append(ep)
            continue
        try:
            found = resolve(*named)
        except OSError:
            found = []
        if not found:
            unresolved.append(ep)
        out.extend(f"tcp://{addr}:{named[1]}" for addr in found)
    return list(dict.fromkeys(out)), unresolved
