"""The HTTP gateway's server: a listening socket (TLS if asked) of ``HttpConnection``s.

Our own server around httptools rather than uvicorn's: uvicorn turns every request
into an ASGI scope dict, a Task, an Event and two ``send`` messages, and that was most
of the gateway's Python per request (docs/PERFORMANCE.md, "OIP gateway"). Here a
connection calls ``HttpApi.handle`` directly (gateway/http_conn.py says how).

Once a second the server stamps the ``date:`` header line and lets every connection
check its timeouts (one timer for all, none per request). ``shutdown`` stops accepting,
lets each connection answer the requests it has in full, and aborts what is left after
the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from email.utils import formatdate

from gateway.http_conn import HttpConnection
from gateway.http_wire import Handler, Limits

log = logging.getLogger("gateway")
SWEEP_S = 1.0
BACKLOG = 2048
CAP_WARN_EVERY_S = 10.0  # how often a full connection table is said in the log


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context with the ssl module's defaults (TLS 1.2 and up, no client certs)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _date_line() -> bytes:
    return b"date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"


class HttpServer:
    def __init__(self, handle: Handler, limits: Limits, tls: ssl.SSLContext | None = None) -> None:
        self.handle = handle
        self.limits = limits
        self.tls = tls
        self.connections: set[HttpConnection] = set()
        self._date = _date_line()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.refused = 0  # connections answered 503: the table was full
        self._warned_at = -CAP_WARN_EVERY_S
        self._refused_since_warning = 0

    def date(self) -> bytes:
        return self._date

    def _connection(self) -> HttpConnection:
        conn = HttpConnection(self.handle, self.limits, self.connections, self.date)
        cap = self.limits.max_connections
        if cap and len(self.connections) >= cap:
            conn.over_capacity = True
            self.refused += 1
            self._refused_since_warning += 1
            now = time.monotonic()
            if now - self._warned_at >= CAP_WARN_EVERY_S:
                log.warning(
                    "HTTP gateway: %d connections open, the most it takes; %d new one(s) "
                    "answered 503 since the last warning",
                    len(self.connections), self._refused_since_warning,
                )  # fmt: skip
                self._warned_at, self._refused_since_warning = now, 0
        return conn

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        # A TLS handshake is no connection of ours until it completes (connection_made),
        # so neither the head timeout nor the cap sees it: it gets head_s of its own,
        # not asyncio's 60 s, before it is dropped.
        shake = self.limits.head_s if self.tls is not None else None
        if sock is not None:  # SO_REUSEPORT: the caller bound it (gateway/main.py)
            self._server = await loop.create_server(
                self._connection,
                sock=sock,
                ssl=self.tls,
                backlog=BACKLOG,
                ssl_handshake_timeout=shake,
            )
        else:
            self._server = await loop.create_server(
                self._connection,
                host,
                port,
                ssl=self.tls,
                backlog=BACKLOG,
                reuse_address=True,
                ssl_handshake_timeout=shake,
            )
        self._sweeper = loop.call_later(SWEEP_S, self._sweep)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._date = _date_line()
        now = loop.time()
        for conn in list(self.connections):
            conn.check(now)
        self._sweeper = loop.call_later(SWEEP_S, self._sweep)

    async def shutdown(self, grace_s: float) -> int:
        """Stop accepting, finish the requests in hand; the connections aborted after
        ``grace_s`` are counted in the result."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        end = time.monotonic() + grace_s
        while self.connections and time.monotonic() < end:
            await asyncio.sleep(0.02)
        left = len(self.connections)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if left:
            log.warning("HTTP gateway: %d connection(s) still busy after %.0f s", left, grace_s)
        return left
