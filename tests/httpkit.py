"""Helpers for the HTTP server tests: the gateway's HttpServer on a loop of its own
thread, a raw-socket reader of HTTP/1.1 answers, and a self-signed certificate."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gateway.http_server import HttpServer
from gateway.http_wire import Handler, Limits


@dataclass
class Served:
    port: int
    server: HttpServer
    loop: asyncio.AbstractEventLoop
    calls: list[tuple[str, str, bytes]] = field(default_factory=list)

    def shutdown(self, grace_s: float) -> int:
        """The server's graceful shutdown, run on its loop; the connections aborted."""
        done = asyncio.run_coroutine_threadsafe(self.server.shutdown(grace_s), self.loop)
        return done.result(timeout=grace_s + 10)


@contextmanager
def serving(
    handle: Handler, limits: Limits | None = None, tls: ssl.SSLContext | None = None
) -> Iterator[Served]:
    """An HttpServer on 127.0.0.1 (a free port) on uvloop, as the gateway runs it."""
    import uvloop

    loop = uvloop.new_event_loop()
    server = HttpServer(handle, limits or Limits(), tls)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started = asyncio.run_coroutine_threadsafe(server.start("127.0.0.1", 0), loop)
    started.result(timeout=10)
    try:
        yield Served(server.port, server, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(0.5), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_answer(reader: BinaryIO) -> Answer:
    """One answer from a buffered reader of the socket (``sock.makefile("rb")``)."""
    status_line = reader.readline()
    if not status_line:
        raise EOFError("the server closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    n = int(headers.get("content-length", "0"))
    body = reader.read(n) if status >= 200 else b""
    return Answer(status, headers, body)


def at_eof(sock: socket.socket) -> bool:
    """True once the server has closed (EOF or a reset) within the socket's timeout."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


OPENSSL = shutil.which("openssl")
NO_OPENSSL = "openssl is not installed (to make a certificate)"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, valid a day, and its key (PEM)."""
    assert OPENSSL is not None, NO_OPENSSL
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key
