"""Client([...]) over many hosts (issue 21): requests spread, a host that stops answering
is taken out with back-off and its request answered elsewhere, names resolve to many
addresses. Real tcp sockets to fake hosts (tests/hostkit.py); the state machine's
decisions with a fake clock."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from hostkit import FakeHost, free_port
from poolkit import wait_for

from router.client import Client
from router.errors import ModelError, RequestTimeout
from router.hosts import (
    TRANSITIONS,
    Backoff,
    Host,
    HostState,
    IllegalTransition,
    SocketOptions,
    expand,
    getaddrinfo_resolver,
    split_tcp,
)

X = np.zeros((1, 4), np.float32)


@pytest.fixture
def three() -> Iterator[list[FakeHost]]:
    hosts = [FakeHost(name) for name in ("a", "b", "c")]
    yield hosts
    for h in hosts:
        h.close()


def spread(hosts: list[FakeHost], **kw: object) -> Client:
    opts: dict[str, object] = {"timeout": 10.0, "backoff": Backoff(0.3, 2.0), **kw}
    return Client([h.endpoint for h in hosts], **opts)  # type: ignore[arg-type]


def answered_by(client: Client, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        r = client.infer("m", X)
        assert r.outputs[0].tobytes().decode() == r.version  # the host's own answer
        assert r.endpoint.startswith("tcp://")
        seen[r.version] += 1
    return seen


def test_requests_spread_over_every_host(three: list[FakeHost]) -> None:
    with spread(three) as c:
        answered_by(c, 3)  # the first calls go where a handshake finished first
        wait_for(lambda: all(h["state"] == "up" for h in c.hosts()), 10, "every host up")
        seen = answered_by(c, 30)
    assert seen == {"a": 10, "b": 10, "c": 10}  # round robin


def test_the_result_names_the_host_that_answered(three: list[FakeHost]) -> None:
    by_name = {h.name: h.endpoint for h in three}
    with spread(three) as c:
        for _ in range(6):
            r = c.infer("m", X)
            assert r.endpoint == by_name[r.version]


@pytest.mark.slow
def test_a_silent_host_is_taken_out_with_back_off(three: list[FakeHost]) -> None:
    a, b, c_ = three
    b.mode = "silent"
    with spread(three, try_timeout=0.3) as c:
        seen = answered_by(c, 40)
        assert "b" not in seen and seen["a"] + seen["c"] == 40  # every request answered
        state = {h["endpoint"]: h for h in c.hosts()}[b.endpoint]
        assert state["state"] in ("down", "probing") and state["failures"] >= 1
        # Back-off: b was tried once, then left alone while it was out (40 calls to a
        # host that answers in microseconds take far less than the back-off steps).
        assert b.received <= 1 + state["failures"]
        b.mode = "ok"
        wait_for(lambda: "b" in answered_by(c, 3), 15, "b back after its back-off")
        assert {h["endpoint"]: h for h in c.hosts()}[b.endpoint]["state"] == "up"


def test_a_host_dying_under_a_request_is_noticed_at_once(three: list[FakeHost]) -> None:
    """No try_timeout: the dropped connection itself moves the request elsewhere, long
    before the 20 s deadline."""
    for h in three:
        h.mode = "die"
    three[0].mode = "ok"
    with spread(three, timeout=20.0) as c:
        t0 = time.monotonic()
        seen = answered_by(c, 6)
        took = time.monotonic() - t0
    assert seen == {"a": 6}
    assert three[1].received == 1 and three[2].received == 1
    assert took < 10.0, f"failover waited for the deadline ({took:.1f}s)"


def test_shutting_down_sends_the_request_elsewhere(three: list[FakeHost]) -> None:
    three[2].mode = "shutting_down"
    with spread(three) as c:
        seen = answered_by(c, 12)
        assert seen["c"] == 0 and sum(seen.values()) == 12
        state = {h["endpoint"]: h["state"] for h in c.hosts()}
        assert state[three[2].endpoint] in ("down", "probing")


def test_an_ordinary_error_is_the_answer_not_retried(three: list[FakeHost]) -> None:
    for h in three:
        h.mode = "model_error"
    with spread(three) as c, pytest.raises(ModelError):
        c.infer("m", X)
    assert sum(h.received for h in three) == 1


@pytest.mark.slow
def test_no_host_answering_times_out_naming_them(three: list[FakeHost]) -> None:
    for h in three:
        h.mode = "silent"
    with spread(three, timeout=1.0, try_timeout=0.2) as c:
        with pytest.raises(RequestTimeout) as info:
            c.infer("m", X, timeout=1.0)
    for h in three:
        assert h.endpoint in str(info.value)


@pytest.mark.slow
def test_a_spent_deadline_blames_only_the_host_that_used_it(three: list[FakeHost]) -> None:
    for h in three:
        h.mode = "silent"
    with spread(three) as c:  # no try_timeout: the first host gets the whole deadline
        answered_by(c, 0)
        wait_for(lambda: all(h["state"] == "up" for h in c.hosts()), 10, "every host up")
        with pytest.raises(RequestTimeout):
            c.infer("m", X, timeout=0.5)
        failures = sorted(h["failures"] for h in c.hosts())
    assert failures == [0, 0, 1] and sum(h.received for h in three) == 1


@pytest.mark.slow
def test_a_name_stands_for_all_its_addresses() -> None:
    """A headless Service: one name, one A record per pod; the set follows the records."""
    port = free_port()
    hosts = {ip: FakeHost(ip, ip, port) for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3")}
    records = ["127.0.0.1", "127.0.0.2"]
    try:
        with Client(
            [f"tcp://pool.test:{port}"],
            timeout=5.0,
            resolve=lambda name, _port: list(records) if name == "pool.test" else [],
            refresh_s=0.2,
        ) as c:
            assert set(answered_by(c, 10)) == {"127.0.0.1", "127.0.0.2"}
            records[:] = ["127.0.0.2", "127.0.0.3"]  # a pod replaced
            wait_for(lambda: "127.0.0.3" in answered_by(c, 4), 10, "the new address in use")
            assert set(answered_by(c, 10)) == {"127.0.0.2", "127.0.0.3"}
            records[:] = []  # DNS hiccup: keep what we had
            time.sleep(0.3)
            assert set(answered_by(c, 10)) == {"127.0.0.2", "127.0.0.3"}
    finally:
        for h in hosts.values():
            h.close()


def test_the_default_resolver_expands_localhost() -> None:
    found, unresolved = expand(["tcp://localhost:5555", "ipc:///x.sock"], getaddrinfo_resolver)
    assert "tcp://127.0.0.1:5555" in found and "ipc:///x.sock" in found and not unresolved
    assert expand(["tcp://no-such-host.invalid:1"], getaddrinfo_resolver) == (
        [],
        ["tcp://no-such-host.invalid:1"],
    )
    assert split_tcp("tcp://10.0.0.1:5") is None and split_tcp("tcp://[::1]:5") is None
    assert split_tcp("tcp://pool.ns.svc:5555") == ("pool.ns.svc", 5555)


def test_one_endpoint_string_is_the_one_host_client(three: list[FakeHost]) -> None:
    with Client(three[0].endpoint, timeout=5.0) as c:
        assert c.spread is None
        r = c.infer("m", X)
    assert (r.version, r.endpoint) == ("a", three[0].endpoint)


# ------------------------------------------------------------ decisions, fake clock
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_back_off_doubles_up_to_its_cap_and_probing_recovers() -> None:
    clock = FakeClock()
    ctx = zmq.Context.instance()
    host = Host("tcp://127.0.0.1:9", ctx, SocketOptions(), Backoff(0.5, 3.0), clock)
    try:
        delays = []
        for _ in range(5):
            host.fail("test")
            assert host.state is HostState.DOWN
            delays.append(host.down_until - clock.now)
            clock.now = host.down_until
            host.tick()
            assert host.state is HostState.PROBING
        assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
        host.succeed()
        assert host.state is HostState.UP and host.failures == 0
        host.fail("again")
        assert host.down_until - clock.now == 0.5  # a success resets the back-off
    finally:
        host.close()


def test_illegal_transitions_raise() -> None:
    ctx = zmq.Context.instance()
    host = Host("tcp://127.0.0.1:9", ctx, SocketOptions(), Backoff(), FakeClock())
    try:
        for src, allowed in TRANSITIONS.items():
            for dst in set(HostState) - allowed:
                host.state = src
                with pytest.raises(IllegalTransition):
                    host.move(dst)
    finally:
        host.close()


def test_the_raw_pyzmq_example_steps_around_failed_hosts(three: list[FakeHost]) -> None:
    """docs/examples/raw_spread_client.py (embedded in PROTOCOL.md) against one host that
    dies under its first request and one that is shutting down: every call answered."""
    example = Path(__file__).resolve().parent.parent / "docs" / "examples"
    source = (example / "raw_spread_client.py").read_text()
    protocol = (example.parent / "PROTOCOL.md").read_text()
    assert source.strip() in protocol, "PROTOCOL.md must embed raw_spread_client.py"
    three[0].mode, three[1].mode = "die", "shutting_down"
    done = subprocess.run(
        [
            sys.executable,
            str(example / "raw_spread_client.py"),
            "m",
            "12",
            *(h.endpoint for h in three),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [f"{three[2].endpoint} c"] * 12
    assert three[0].received == 1 and three[1].received >= 1
