"""The gateway's spinning selector: it catches what arrives inside its window without
sleeping, never spins when the loop has work, honours the loop's timeout, and carries a
real asyncio loop (connections, timers) the way uvloop does."""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time

from gateway.main import _loop_runner, parse_args
from gateway.spin_loop import SpinningSelector, spinning_loop_factory


def _pair_registered(sel: selectors.BaseSelector) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.setblocking(False)
    sel.register(b, selectors.EVENT_READ)
    return a, b


def test_an_event_inside_the_window_is_caught_while_spinning() -> None:
    sel = SpinningSelector(spin_us=2_000_000)  # 2 s: far longer than the write below
    a, b = _pair_registered(sel)
    try:
        threading.Timer(0.02, a.send, (b"x",)).start()
        t0 = time.monotonic()
        ready = sel.select(timeout=5.0)
        took = time.monotonic() - t0
        assert [key.fileobj for key, _ in ready] == [b]
        assert sel.spins == 1 and sel.caught == 1
        assert took < 1.0  # returned on the write, not at the end of the window
    finally:
        sel.close()
        a.close()
        b.close()


def test_no_spin_when_the_loop_has_work_and_the_timeout_is_kept() -> None:
    sel = SpinningSelector(spin_us=3_000_000)  # a window far past every timeout below
    a, b = _pair_registered(sel)
    try:
        assert sel.select(timeout=0) == [] and sel.spins == 0  # ready callbacks: poll only
        t0 = time.monotonic()
        assert sel.select(timeout=0.01) == []  # a timer due before the window ends
        assert time.monotonic() - t0 < 1.5 and sel.spins == 1 and sel.caught == 0
        sel.spin_s = 0.05
        t0 = time.monotonic()
        assert sel.select(timeout=0.2) == []  # spins 50 ms, then sleeps the rest
        assert 0.19 <= time.monotonic() - t0 < 1.5
    finally:
        sel.close()
        a.close()
        b.close()


def test_a_real_loop_on_it_serves_a_connection_and_its_timers() -> None:
    """An echo server on the spinning loop: 200 round trips from a client thread, each
    answered while the loop spins (the client writes again at once), timers still fire."""
    loop = spinning_loop_factory(200_000)()
    sel = loop._selector  # type: ignore[attr-defined]
    assert isinstance(sel, SpinningSelector)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main() -> int:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        done: list[int] = []

        def client() -> None:
            with socket.create_connection(("127.0.0.1", port)) as c:
                for i in range(200):
                    c.sendall(b"%d" % i)
                    assert c.recv(100) == b"%d" % i
                    done.append(i)

        t = threading.Thread(target=client)
        t.start()
        fired = loop.create_future()
        loop.call_later(0.05, fired.set_result, True)
        while t.is_alive():
            await asyncio.sleep(0.01)
        t.join()
        assert await fired
        server.close()
        await server.wait_closed()
        return len(done)

    try:
        assert loop.run_until_complete(main()) == 200
        assert sel.caught > 100  # most client writes landed inside a window
    finally:
        loop.close()


def test_spin_us_picks_the_spinning_loop() -> None:
    assert parse_args(["--protocol", "http", "--listen", "127.0.0.1:1", "--frontend", "x",
                       "--control", "y"]).spin_us == 0  # fmt: skip
    seen: list[type] = []

    async def which() -> int:
        seen.append(type(asyncio.get_running_loop()._selector))  # type: ignore[attr-defined]
        return 7

    assert _loop_runner(100)(which()) == 7
    assert seen == [SpinningSelector]
