"""The HTTP gateway's server side: a bare ASGI app around ``HttpApi``, and uvicorn's
httptools protocol taught to write a response in one syscall.

uvicorn writes the status line and headers when the app sends ``http.response.start``
and the body when it sends ``http.response.body``: two writes, two TCP segments and, on
a loaded host, two wake-ups of the client per response. ``OneWriteProtocol`` wraps each
connection's transport so that the app can ask for the header block to be held back
and written together with the body (one ``writelines``, one ``writev``). The app finds
that wrapper in the scope under ``HOLD_KEY``; under any other ASGI server it is absent
and the app behaves as a plain ASGI app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http_api import HttpApi, Response, too_big

HOLD_KEY = "gpu_pool.hold_headers"  # scope key: a callable that holds the next write

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# The request headers the API reads; the rest are never decoded.
_WANTED = frozenset(
    {b"content-length", b"content-encoding", b"inference-header-content-length", b"authorization"}
)


class OneWrite:
    """A transport that can hold one write back and send it with the next."""

    __slots__ = ("transport", "held", "holding")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.held: bytes | None = None
        self.holding = False

    def hold_next(self) -> None:
        self.holding = True

    def write(self, data: bytes) -> None:
        if self.holding:
            self.holding, self.held = False, data
            return
        held = self.held
        if held is None:
            self.transport.write(data)
        else:
            self.held = None
            self.transport.writelines((held, data))  # one writev, no copy of the body

    def flush(self) -> None:
        self.holding = False
        if self.held is not None:
            held, self.held = self.held, None
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self.transport, name)


class OneWriteProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``OneWrite`` transport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(OneWrite(transport))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        scope[HOLD_KEY] = self.transport.hold_next  # type: ignore[attr-defined]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def asgi_app(api: HttpApi) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """A bare ASGI app around ``api``: uvicorn parses HTTP (httptools), we route."""
    max_body = api.max_body
    handle = api.handle

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await _lifespan(receive, send)
            return
        # uvicorn gives header names lower-cased already (httptools does that)
        headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED
        }
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            resp = too_big(max_body)  # refused before a byte of it is read
        else:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            if msg.get("more_body"):
                parts, size = [body], len(body)
                while True:
                    if size > max_body:  # chunked bodies declare nothing: count as they come
                        break
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    parts.append(chunk)
                    if not msg.get("more_body"):
                        break
                body = b"".join(parts)
            if len(body) > max_body:
                resp = too_big(max_body)
            else:
                resp = await handle(scope["method"], scope["path"], headers, body)
        await _respond(scope, send, resp)

    return app


async def _respond(scope: dict[str, Any], send: Send, resp: Response) -> None:
    hold = scope.get(HOLD_KEY)
    if hold is not None and scope["method"] != "HEAD":  # HEAD: no body write to join
        hold()
    await send(
        {
            "type": "http.response.start",
            "status": resp.status,
            "headers": [*resp.headers, (b"content-length", str(len(resp.body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": resp.body})
