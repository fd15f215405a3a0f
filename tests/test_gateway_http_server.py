"""gateway/http_server.py + http_conn.py over raw sockets: pipelining, keep-alive and
close, chunked bodies, the limits, malformed requests, the timeouts, a client that never
reads, TLS and the graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from httpkit import NO_OPENSSL, OPENSSL, at_eof, connect, read_answer, self_signed, serving

from gateway.http_api import Response
from gateway.http_server import tls_context
from gateway.http_wire import Limits

calls: list[tuple[str, str, bytes]] = []


async def handle(method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
    """/slow/MS answers after MS ms, /big/N with N bytes, anything else echoes."""
    calls.append((method, path, body))
    if path.startswith("/slow/"):
        await asyncio.sleep(int(path[6:]) / 1000)
    if path.startswith("/big/"):
        return Response(200, b"x" * int(path[5:]))
    return Response(200, f"{method} {path} ".encode() + body)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    calls.clear()


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    with serving(handle) as s, connect(s.port) as c:
        c.sendall(
            b"GET /slow/200 HTTP/1.1\r\nHost: x\r\n\r\n"  # the first one takes longest
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /b?q=1 HTTP/1.1\r\n\r\n"
        )
        r = c.makefile("rb")
        got = [read_answer(r) for _ in range(3)]
        assert [a.body for a in got] == [b"GET /slow/200 ", b"POST /a abc", b"GET /b "]
        assert all(a.status == 200 and "connection" not in a.headers for a in got)
        c.sendall(b"GET /again HTTP/1.1\r\n\r\n")  # still open: keep-alive
        assert read_answer(r).body == b"GET /again "


@pytest.mark.parametrize(
    "request_bytes",
    [b"GET /x HTTP/1.0\r\n\r\n", b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n"],
    ids=["http1.0", "connection-close"],
)
def test_http10_and_connection_close_get_one_answer_then_eof(request_bytes: bytes) -> None:
    with serving(handle) as s, connect(s.port) as c:
        c.sendall(request_bytes + b"GET /never HTTP/1.1\r\n\r\n")  # read no further
        r = c.makefile("rb")
        a = read_answer(r)
        assert a.status == 200 and a.body == b"GET /x "
        assert a.headers["connection"] == "close"
        assert r.read() == b""
        assert [path for _, path, _ in calls] == ["/x"]


def test_chunked_and_percent_encoded_and_head() -> None:
    with serving(handle) as s, connect(s.port) as c:
        c.sendall(
            b"POST /m%20x/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            b"HEAD /h HTTP/1.1\r\n\r\n"
            b"GET /after HTTP/1.1\r\n\r\n"
        )
        r = c.makefile("rb")
        assert read_answer(r).body == b"POST /m x/infer hello world"
        line = r.readline()  # HEAD: read by hand, read_answer would wait for the body
        assert line.startswith(b"HTTP/1.1 200")
        lines = []
        while (line := r.readline()) != b"\r\n":
            lines.append(line)
        assert b"content-length: 8\r\n" in lines  # what GET /h would send, no body
        assert read_answer(r).body == b"GET /after "


def _error(body: bytes) -> str:
    return str(json.loads(body)["error"])


def test_a_malformed_request_gets_400_and_the_connection_closes() -> None:
    with serving(handle) as s, connect(s.port) as c:
        c.sendall(b"GET /ok HTTP/1.1\r\n\r\nNOT\x01HTTP\r\n\r\n")
        r = c.makefile("rb")
        assert read_answer(r).status == 200  # the good one before it is answered first
        bad = read_answer(r)
        assert bad.status == 400 and bad.headers["connection"] == "close"
        assert "malformed" in _error(bad.body)
        assert r.read() == b""


def test_a_body_over_the_limit_is_refused_unread() -> None:
    with serving(handle, Limits(max_body=100)) as s:
        with connect(s.port) as c:  # declared: refused on the headers, nothing sent yet
            c.sendall(b"POST /a HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
            a = read_answer(c.makefile("rb"))
            assert a.status == 413 and "over 100 bytes" in _error(a.body)
            assert at_eof(c)
        with connect(s.port) as c:  # chunked: counted as it comes
            c.sendall(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            c.sendall(b"3c\r\n" + b"x" * 60 + b"\r\n")
            c.sendall(b"3c\r\n" + b"x" * 60 + b"\r\n")
            a = read_answer(c.makefile("rb"))
            assert a.status == 413 and a.headers["connection"] == "close"
        with connect(s.port) as c:  # exactly the limit is fine
            c.sendall(b"POST /c HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"y" * 100)
            assert read_answer(c.makefile("rb")).status == 200
    assert [path for _, path, _ in calls] == ["/c"]


def test_expect_100_continue() -> None:
    with serving(handle, Limits(max_body=100)) as s:
        with connect(s.port) as c:
            c.sendall(b"POST /e HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            r = c.makefile("rb")
            assert r.readline() == b"HTTP/1.1 100 Continue\r\n" and r.readline() == b"\r\n"
            c.sendall(b"body")
            assert read_answer(r).body == b"POST /e body"
        with connect(s.port) as c:  # over the limit: 413 at once, no 100
            c.sendall(b"POST /e HTTP/1.1\r\nContent-Length: 400\r\nExpect: 100-continue\r\n\r\n")
            assert read_answer(c.makefile("rb")).status == 413


@pytest.mark.slow  # waits out the server's timers
def test_slow_headers_get_408_and_idle_connections_close() -> None:
    limits = Limits(head_s=0.5, keepalive_s=0.5, body_s=0.5)
    with serving(handle, limits) as s:
        with connect(s.port, timeout=5) as c:
            t0 = time.monotonic()
            c.sendall(b"GET /slowloris HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            a = read_answer(c.makefile("rb"))
            assert a.status == 408 and "head" in _error(a.body)
            assert time.monotonic() - t0 < 3  # head_s + one sweep, with room
        with connect(s.port, timeout=5) as c:
            c.sendall(b"POST /b HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")  # stalls
            assert read_answer(c.makefile("rb")).status == 408
        with connect(s.port, timeout=5) as c:  # silent after an answer: closed, no answer
            c.sendall(b"GET /once HTTP/1.1\r\n\r\n")
            r = c.makefile("rb")
            assert read_answer(r).status == 200
            assert r.read() == b""
        with connect(s.port, timeout=5) as c:  # silent from the start: the same
            assert at_eof(c)
    assert [path for _, path, _ in calls] == ["/once"]


def test_a_huge_head_gets_431() -> None:
    with serving(handle, Limits(max_head=8 << 10)) as s, connect(s.port) as c:
        c.sendall(b"GET /h HTTP/1.1\r\n")
        for _ in range(64):  # 64 KiB of headers, 1 KiB a write
            try:
                c.sendall(b"X-Pad: " + b"p" * 1017 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.002)
        a = read_answer(c.makefile("rb"))
        assert a.status == 431 and "head over" in _error(a.body)
    assert calls == []


@pytest.mark.slow  # waits out the server's timers
def test_a_client_that_never_reads_is_paused_then_dropped() -> None:
    """Answers of 1 MiB to a client that only sends: the server stops reading its
    requests once the write buffer is full, and drops the connection after send_s."""
    with serving(handle, Limits(send_s=1.0)) as s:
        c = connect(s.port)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        c.setblocking(False)
        sent = 0
        request = b"GET /big/1048576 HTTP/1.1\r\n\r\n"
        end = time.monotonic() + 3
        while time.monotonic() < end and sent < 2000:
            try:
                c.send(request)  # a partial send is fine: the byte count is what matters
                sent += 1
            except BlockingIOError:
                time.sleep(0.01)
        handled = len(calls)
        assert handled < 10, handled  # paused: not 2,000 MiB of answers buffered
        c.setblocking(True)
        c.settimeout(10)
        got = 0
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:  # the abort comes after send_s unread
                time.sleep(0.5)
                data = c.recv(1 << 20)
                if not data:
                    break
                got += len(data)
        except ConnectionResetError:
            pass
        c.close()
        assert got < 100 << 20
        with connect(s.port) as other:  # the server is fine
            other.sendall(b"GET /ok HTTP/1.1\r\n\r\n")
            assert read_answer(other.makefile("rb")).status == 200


def test_graceful_shutdown_finishes_what_is_in_flight() -> None:
    with serving(handle) as s:
        busy, idle = connect(s.port), connect(s.port)
        busy.sendall(b"GET /slow/300 HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.shutdown(5) == 0
        a = read_answer(busy.makefile("rb"))
        assert a.status == 200 and a.headers["connection"] == "close"
        assert at_eof(busy) and at_eof(idle)
        with pytest.raises(OSError):
            connect(s.port, timeout=2)  # no longer accepting
        busy.close()
        idle.close()



@pytest.mark.skipif(OPENSSL is None, reason=NO_OPENSSL)
def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with serving(handle, tls=tls_context(str(cert), str(key))) as s:
        ctx = ssl.create_default_context(cafile=str(cert))
        with ctx.wrap_socket(connect(s.port), server_hostname="localhost") as c:
            c.sendall(
                b"POST /t HTTP/1.1\r\nContent-Length: 2\r\n\r\nok" + b"GET /u HTTP/1.1\r\n\r\n"
            )
            r = c.makefile("rb")
            assert read_answer(r).body == b"POST /t ok"
            assert read_answer(r).body == b"GET /u "
        with connect(s.port) as plain:  # plain HTTP on the TLS port: no HTTP answer
            plain.sendall(b"GET /v HTTP/1.1\r\n\r\n")
            assert not plain.recv(100).startswith(b"HTTP/")
    assert [path for _, path, _ in calls] == ["/t", "/u"]


@pytest.mark.slow  # waits out the handshake timeout
@pytest.mark.skipif(OPENSSL is None, reason=NO_OPENSSL)
def test_a_tls_handshake_that_never_comes_is_dropped_after_head_s(tmp_path: Path) -> None:
    """A TLS handshake is not a connection of ours until it completes, so the head timeout
    does not see it: it has head_s of its own, not asyncio's 60 s."""
    cert, key = self_signed(tmp_path)
    with serving(handle, Limits(head_s=1.0), tls=tls_context(str(cert), str(key))) as s:
        with connect(s.port, timeout=10) as silent:
            t0 = time.monotonic()
            assert at_eof(silent)
            assert time.monotonic() - t0 < 5
    assert calls == []


def test_an_upgrade_is_answered_over_http11_then_closed() -> None:
    with serving(handle) as s, connect(s.port) as c:
        c.sendall(
            b"GET /up HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        )
        r = c.makefile("rb")
        assert read_answer(r).body == b"GET /up "
        assert r.read() == b""


def test_a_client_that_half_closes_still_gets_its_answers() -> None:
    with serving(handle) as s, connect(s.port) as c:
        c.sendall(b"GET /slow/100 HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n")
        c.shutdown(socket.SHUT_WR)  # EOF while the first is being computed
        r = c.makefile("rb")
        assert read_answer(r).body == b"GET /slow/100 "
        last = read_answer(r)
        assert last.body == b"GET /second " and last.headers["connection"] == "close"
        assert r.read() == b""


@pytest.mark.slow  # waits out the server's timers
def test_bytes_that_are_no_request_keep_no_connection_open() -> None:
    """Idle time counts from the last answer: stray CRLFs (which llhttp skips) are not
    activity, and a refused client that keeps sending is cut off after linger_s."""
    with serving(handle, Limits(keepalive_s=0.5, linger_s=0.5, max_body=10)) as s:
        with connect(s.port, timeout=0.2) as c:
            t0 = time.monotonic()
            closed = False
            while not closed and time.monotonic() - t0 < 5:
                try:
                    c.sendall(b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                closed = at_eof(c)  # waits the 0.2 s timeout when still open
            assert time.monotonic() - t0 < 3
        with connect(s.port, timeout=0.2) as c:
            c.sendall(b"POST /big HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n")
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 5:
                    c.sendall(b"x" * 4096)  # never stops: the linger does
                    time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert time.monotonic() - t0 < 3
    assert calls == []


@pytest.mark.slow  # waits out the server's timers
def test_a_body_that_trickles_in_gets_408_though_it_never_stalls() -> None:
    """A byte every half second never stalls for body_s, but is far below the minimum
    rate once body_s has passed: 408, so a slow-POST client cannot hold a connection."""
    limits = Limits(body_s=1.0, min_body_rate=100)
    with serving(handle, limits) as s, connect(s.port, timeout=10) as c:
        c.sendall(b"POST /trickle HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        answer = None
        c.settimeout(0.5)
        while time.monotonic() - t0 < 6 and answer is None:
            try:
                c.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                head = c.recv(4096, socket.MSG_PEEK)
            except TimeoutError:
                continue
            if head:
                answer = read_answer(c.makefile("rb"))
        assert answer is not None and answer.status == 408
        assert "slower than 100 bytes/s" in _error(answer.body)
        assert 1.0 <= time.monotonic() - t0 < 4  # body_s, then the next sweep
    assert calls == []


def test_a_body_at_a_fair_rate_is_not_cut_off() -> None:
    """The rate is averaged from the body's start: a body that pauses but keeps up is
    answered."""
    limits = Limits(body_s=0.5, min_body_rate=100)
    with serving(handle, limits) as s, connect(s.port, timeout=10) as c:
        c.sendall(b"POST /steady HTTP/1.1\r\nContent-Length: 400\r\n\r\n")
        for _ in range(4):
            c.sendall(b"y" * 100)
            time.sleep(0.3)  # 333 bytes/s on average
        a = read_answer(c.makefile("rb"))
        assert a.status == 200
    assert [path for _, path, _ in calls] == ["/steady"]


def test_past_the_connection_cap_a_new_client_gets_503_and_the_others_are_served() -> None:
    with serving(handle, Limits(max_connections=3)) as s:
        held = [connect(s.port) for _ in range(3)]
        try:
            time.sleep(0.2)  # all three accepted
            with connect(s.port) as extra:
                extra.sendall(b"GET /extra HTTP/1.1\r\nHost: x\r\n\r\n")
                a = read_answer(extra.makefile("rb"))
                assert a.status == 503 and "too many connections" in _error(a.body)
                assert a.headers.get("connection") == "close"
            assert s.server.refused == 1
            held[0].sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(held[0].makefile("rb")).status == 200
        finally:
            for c in held:
                c.close()
        time.sleep(0.3)  # their connection_lost ran: the table has room again
        with connect(s.port) as again:
            again.sendall(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(again.makefile("rb")).status == 200
    assert [path for _, path, _ in calls] == ["/held", "/again"]


def test_the_gateway_takes_as_many_connections_as_its_descriptors_allow() -> None:
    import resource

    from gateway.main import FD_RESERVE, connection_cap

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))
        cap = connection_cap()
        now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == hard  # raised to the hard limit first
        limit = now if now != resource.RLIM_INFINITY else 1 << 20
        assert cap == max(16, limit - FD_RESERVE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
