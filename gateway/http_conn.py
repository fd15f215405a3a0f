"""One HTTP/1.1 connection of the OIP gateway: llhttp (httptools) parses, the API answers.

Nothing in between: the parser's callbacks fill a ``Request`` record, the API's
coroutine is driven by hand (``_drive``: sent to until it returns, resumed by the future
it waits on; no Task, no ASGI messages) and its ``Response`` goes out in one write.

- Requests are answered one at a time in the order they came (pipelining); complete
  requests wait in ``queue``. Reading pauses while ``Limits.pipeline`` wait or while the
  transport's write buffer is over its high-water mark (``pause_writing``).
- HTTP/1.0 and ``Connection: close``: nothing more is read; the answer says
  ``connection: close`` and the connection closes once it is written.
- A refusal (400 malformed, 408 too slow, 413 body over the limit, 431 head too big)
  is answered in its turn, then the connection half-closes and drops what the client
  still sends for ``Limits.linger_s``, so that its kernel does not reset the
  connection before it has read the answer.
- ``Expect: 100-continue`` is answered at once when nothing is ahead in the queue
  (an interim answer must not overtake an earlier request's); over the limit it is 413.
- The server's sweep (http_server.py) calls ``check`` once a second for the timeouts:
  a head not complete in ``head_s``, a body silent for ``body_s`` or, past ``body_s``,
  slower than ``min_body_rate`` on average (408); idle for ``keepalive_s`` (closed).
- Past the server's ``max_connections``, a new connection is answered 503 and closed.

The read phase and its transitions (``_NEXT``)::

    IDLE --first byte--> HEAD --headers--> BODY --message complete--> IDLE
    IDLE | HEAD | BODY --refusal, Connection: close, EOF, shutdown--> CLOSING
    any --connection lost--> CLOSED
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast
from urllib.parse import unquote

import httptools

from gateway.http_api import Response
from gateway.http_wire import (
    CONTINUE,
    COPY_MAX,
    METHODS,
    STATUS,
    WANTED,
    Handler,
    Limits,
    Request,
    refusal,
)

log = logging.getLogger("gateway")


class Phase(enum.Enum):
    IDLE = "idle"  # between requests
    HEAD = "head"  # a request line and headers are arriving
    BODY = "body"  # that request's body is arriving
    CLOSING = "closing"  # nothing more is read: answer what is queued, then close
    CLOSED = "closed"

    # Members are singletons: hash by identity in C, not by name in Python (Enum's
    # __hash__), as _to looks each transition up three times per request.
    __hash__ = object.__hash__


_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.HEAD, Phase.CLOSING, Phase.CLOSED}),
    Phase.HEAD: frozenset({Phase.BODY, Phase.CLOSING, Phase.CLOSED}),
    Phase.BODY: frozenset({Phase.IDLE, Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class _Stop(Exception):
    """Raised from a parser callback: parse nothing more of this connection."""


# What a malformed request makes a callback raise (a bad URL, a method not ASCII).
_EXPECTED = (_Stop, ValueError, httptools.HttpParserError)


class HttpConnection(asyncio.Protocol):
    def __init__(
        self,
        handle: Handler,
        limits: Limits,
        connections: set[HttpConnection],
        date: Callable[[], bytes],
    ) -> None:
        self.handle = handle
        self.limits = limits
        self.connections = connections
        self.date = date  # the current ``date:`` header line, kept by the server
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.tls = False
        self.phase = Phase.IDLE
        self.queue: deque[Request] = deque()
        self.current: Request | None = None  # the request the API has
        self.coro: Coroutine[Any, Any, Response] | None = None
        self.read_paused = self.write_paused = self.lingering = False
        # loop.time() stamps for the timeouts (check): the last bytes in, the last answer
        # out (idle is counted from it: bytes that are no request, such as stray CRLFs,
        # keep nothing open), the current head's first byte, the write pause, the linger
        self.stamp = self.answered_at = self.head_at = self.paused_at = self.loop.time()
        self.body_at = self.stamp  # the current body's start (its headers' end)
        self.over_capacity = False  # set by the server: refuse this one at once
        # the request being parsed
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.body_size = self.head_bytes = 0

    def _to(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise RuntimeError(f"HTTP connection: {self.phase.value} -> {phase.value}")
        self.phase = phase

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.tls = self.transport.get_extra_info("sslcontext") is not None
        self.connections.add(self)
        if self.over_capacity:
            self._refuse(503, "OVERLOADED: too many connections to this gateway; try again")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is not Phase.CLOSED:
            self._to(Phase.CLOSED)
        self.connections.discard(self)
        self.queue.clear()  # an answer still being computed is dropped when it comes

    def data_received(self, data: bytes) -> None:
        self.stamp = self.loop.time()
        if self.phase is Phase.CLOSING or self.phase is Phase.CLOSED:
            return  # lingering, or answering the last request: what comes now is dropped
        counted = self.phase is Phase.HEAD  # a head begun in an earlier read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol to switch to: the request was queued, answer it and close.
            self.shutdown()
        except httptools.HttpParserError as exc:
            if self.phase is Phase.CLOSING or self.phase is Phase.CLOSED:
                return  # our own stop, or data after the last request
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _EXPECTED):
                log.error("HTTP connection: a parser callback failed", exc_info=cause)
            self._refuse(400, f"BAD_REQUEST: malformed HTTP request ({exc})")
            return
        if self.phase is Phase.HEAD:
            if counted:
                self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_head:
                self._refuse(431, f"BAD_REQUEST: request head over {self.limits.max_head} bytes")

    def eof_received(self) -> bool | None:
        if self.lingering or (self.coro is None and not self.queue) or self.tls:
            return None  # close (TLS cannot stay half-open)
        if self.phase is not Phase.CLOSING:
            self._to(Phase.CLOSING)  # a half-sent request is dropped; the complete ones
        return True  # are answered, then the connection closes

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_at = self.loop.time()
        self._reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._reading()
        self._next()  # the answers held back while the client was not reading

    def _reading(self) -> None:
        """Read while the client reads its answers and the queue is short."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.lingering:
            pause = False  # what comes is dropped, and its EOF ends the linger
        else:
            pause = self.write_paused or len(self.queue) >= self.limits.pipeline
        if pause is not self.read_paused:
            self.read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.phase is not Phase.IDLE:
            raise _Stop  # the request before asked to close: nothing more is read
        self._to(Phase.HEAD)
        self.head_at = self.loop.time()
        self.url = b""
        self.headers = {}
        self.body = []
        self.body_size = self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = WANTED.get(name.lower())
        if key is not None:  # llhttp keeps trailing white space (RFC 9110 5.5 excludes it)
            self.headers[key] = value.rstrip(b" \t").decode("latin-1")

    def on_headers_complete(self) -> None:
        self._to(Phase.BODY)
        self.body_at = self.loop.time()
        declared = self.headers.get("content-length", "")
        limit = self.limits.max_body
        if declared.isdigit() and int(declared) > limit:
            self._refuse(413, f"BAD_REQUEST: body over {limit} bytes")  # before a byte of it
            raise _Stop
        if (
            self.headers.get("expect", "").lower() == "100-continue"
            and self.coro is None
            and not self.queue
            and self.transport is not None
        ):
            self.transport.write(CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.limits.max_body:  # chunked bodies declare nothing
            self._refuse(413, f"BAD_REQUEST: body over {self.limits.max_body} bytes")
            raise _Stop
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        url = self.url
        raw = url.partition(b"?")[0] if url[:1] == b"/" else httptools.parse_url(url).path
        path = raw.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        body = self.body
        keep = parser.should_keep_alive() and parser.get_http_version() != "1.0"
        self.queue.append(
            Request(
                METHODS.get(method) or method.decode("latin-1"),
                path,
                self.headers,
                body[0] if len(body) == 1 else b"".join(body),
                keep,
            )
        )
        self._to(Phase.IDLE if keep else Phase.CLOSING)
        if len(self.queue) >= self.limits.pipeline:
            self._reading()
        self._next()
        if not keep:
            raise _Stop

    # ------------------------------------------------------------------ answering

    def _next(self) -> None:
        """Hand the API the next request, while it answers without waiting and the client
        reads what it is sent (no answer is computed into a full write buffer)."""
        while (
            self.coro is None
            and self.queue
            and not self.write_paused
            and self.phase is not Phase.CLOSED
        ):
            req = self.queue.popleft()
            if self.read_paused:
                self._reading()
            self.current = req
            if req.refusal is not None:
                self._answer(req.refusal)
                continue
            self.coro = self.handle(req.method, req.path, req.headers, req.body)
            self._drive()

    def _drive(self) -> bool:
        """Run the API's coroutine to its next wait; True once it has answered."""
        coro = self.coro
        assert coro is not None
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            self.coro = None
            self._answer(done.value)
            return True
        except asyncio.CancelledError:  # the router link closed under it (shutdown)
            self.coro = None
            self._answer(refusal(503, "SHUTTING_DOWN: the gateway is stopping"), close=True)
            return True
        except Exception:
            req = self.current
            log.exception("HTTP API: %s %s failed", req and req.method, req and req.path[:100])
            self.coro = None
            self._answer(refusal(500, "INTERNAL: the gateway failed on this request"), close=True)
            return True
        if waiting is None:  # a bare yield (asyncio.sleep(0)): once round the loop
            self.loop.call_soon(self._resume, None)
        else:  # an asyncio future, as a Task would take it
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(self._resume)
        return False

    def _resume(self, _fut: object) -> None:
        if self._drive():
            self._next()

    def _answer(self, resp: Response, close: bool = False) -> None:
        req, self.current = self.current, None
        transport = self.transport
        if req is None or transport is None or self.phase is Phase.CLOSED:
            return  # the client has gone: nobody to tell
        body = resp.body
        keep = req.keep_alive and not close and req.refusal is None
        parts = [STATUS.get(resp.status) or b"HTTP/1.1 %d \r\n" % resp.status]
        for name, value in resp.headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"content-length: %d\r\n" % len(body), self.date())
        last = not keep or (self.phase is Phase.CLOSING and not self.queue)
        if last:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if req.method == "HEAD" or not body:
            transport.write(b"".join(parts))
        elif len(body) <= COPY_MAX:
            parts.append(body)
            transport.write(b"".join(parts))
        else:
            transport.writelines((b"".join(parts), body))  # one writev, the body uncopied
        self.answered_at = self.loop.time()
        if last:
            if self.phase is not Phase.CLOSING:
                self._to(Phase.CLOSING)
            self.queue.clear()
            self._close(linger=req.refusal is not None)

    def _refuse(self, status: int, text: str) -> None:
        """Answer ``status`` in this request's turn, then close."""
        self.queue.append(Request("", "", {}, b"", False, refusal(status, text)))
        if self.phase is not Phase.CLOSING:
            self._to(Phase.CLOSING)
        self._next()

    def _close(self, linger: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not linger or not transport.can_write_eof():
            transport.close()  # after the buffered answer is written
            return
        transport.write_eof()
        self.lingering = True
        self.answered_at = self.loop.time()  # the linger runs from here, whatever comes
        self._reading()  # read (and drop) until the client closes or linger_s

    # ------------------------------------------------------------------ the server's calls

    def check(self, now: float) -> None:
        """The timeouts, from the stamps kept above (the server calls it every second)."""
        transport, lim, phase = self.transport, self.limits, self.phase
        if transport is None or phase is Phase.CLOSED:
            return
        if self.write_paused and now - self.paused_at > lim.send_s:
            log.info("HTTP connection: answers unread for %.0f s, dropped", lim.send_s)
            transport.abort()
        elif self.lingering:
            if now - self.answered_at > lim.linger_s:
                transport.close()
        elif phase is Phase.HEAD and now - self.head_at > lim.head_s:
            self._refuse(408, f"TIMEOUT: request head not complete within {lim.head_s:g} s")
        elif phase is Phase.BODY and now - self.stamp > lim.body_s:
            self._refuse(408, f"TIMEOUT: request body stalled for {lim.body_s:g} s")
        elif (
            phase is Phase.BODY
            and now - self.body_at > lim.body_s
            and self.body_size < lim.min_body_rate * (now - self.body_at)
        ):
            self._refuse(408, f"TIMEOUT: request body slower than {lim.min_body_rate} bytes/s")
        elif (
            phase is Phase.IDLE
            and self.coro is None
            and not self.queue
            and now - self.answered_at > lim.keepalive_s
        ):
            transport.close()

    def shutdown(self) -> None:
        """Read nothing more; answer the complete requests, then close."""
        if self.phase is Phase.CLOSED or self.phase is Phase.CLOSING:
            return
        self._to(Phase.CLOSING)
        if self.coro is None and not self.queue:
            self._close(linger=False)
