"""gateway/http_server.py: a held header block goes out with the body in one call."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.http_api import Response
from gateway.http_server import HOLD_KEY, OneWrite, _respond


class Transport:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, chunks: Any) -> None:
        self.calls.append(("writelines", tuple(chunks)))

    def close(self) -> None:
        self.calls.append(("close", None))

    def is_closing(self) -> bool:
        return False


def test_held_headers_go_with_the_body_and_nothing_is_lost_on_close() -> None:
    real = Transport()
    t = OneWrite(real)  # type: ignore[arg-type]
    t.hold_next()
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.calls == []
    t.write(b"body")
    t.write(b"next")  # nothing held: straight through
    t.hold_next()
    t.write(b"headers of a response cut short")
    t.close()
    assert real.calls == [
        ("writelines", (b"HTTP/1.1 200 OK\r\n\r\n", b"body")),
        ("write", b"next"),
        ("write", b"headers of a response cut short"),
        ("close", None),
    ]
    assert t.is_closing() is False  # the rest is the real transport's


def _respond_once(method: str) -> tuple[int, list[dict[str, Any]]]:
    holds: list[int] = []
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"method": method, HOLD_KEY: lambda: holds.append(1)}
    asyncio.run(_respond(scope, send, Response(200, b"abc")))
    return len(holds), sent


def test_the_app_holds_for_a_body_but_not_for_head() -> None:
    for method, held in (("POST", 1), ("HEAD", 0)):
        holds, sent = _respond_once(method)
        assert holds == held
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        assert (b"content-length", b"3") in sent[0]["headers"]
