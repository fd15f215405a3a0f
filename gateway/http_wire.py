"""The HTTP server's records and bytes: its limits, a parsed request, status lines, and
the server's own answers (gateway/http_conn.py uses them)."""

from __future__ import annotations

import http
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.http_api import Response

Handler = Callable[[str, str, dict[str, str], bytes], Coroutine[Any, Any, Response]]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection may cost, in bytes and seconds (time.monotonic's)."""

    max_body: int = 1 << 30
    max_head: int = 64 << 10  # request line and headers (counted to within one read)
    keepalive_s: float = 5.0  # idle between requests (uvicorn's default too)
    head_s: float = 10.0  # a request's first byte to the end of its headers (slowloris)
    body_s: float = 30.0  # the longest silence inside a body
    # ... and, once a body has run body_s, the slowest it may arrive on average: a client
    # trickling a byte every body_s would otherwise hold its connection for ever
    min_body_rate: int = 1024  # bytes per second
    # Open connections at once (0: no cap); past it a new one is answered 503 and closed,
    # so that idle or slow clients cannot take every descriptor (gateway/main.py sets it
    # from RLIMIT_NOFILE).
    max_connections: int = 0
    send_s: float = 30.0  # the longest a client may leave its answers unread
    linger_s: float = 2.0  # after a refusal: drop what still comes, then close
    pipeline: int = 16  # complete requests waiting before reading pauses


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    refusal: Response | None = None  # the server's own answer, in the request's turn


STATUS = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus if s >= 100
}
JSON = (b"content-type", b"application/json")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
COPY_MAX = 64 << 10  # a larger body goes beside its header block (writelines), uncopied
METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH")}
# The request headers anyone reads (lower-cased name -> the API's key); others are skipped.
WANTED = {
    k.encode(): k
    for k in (
        "content-length",
        "content-encoding",
        "inference-header-content-length",
        "authorization",
        "expect",
    )
}


def refusal(status: int, text: str) -> Response:
    """The server's own answer, shaped as the API's errors are: ``{"error": text}``."""
    return Response(status, json.dumps({"error": text}).encode(), [JSON])
