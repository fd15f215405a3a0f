"""pool.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.sdnotify import Notifier, watchdog_interval


class Receiver:
    """A bound datagram socket that plays systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value  # what $NOTIFY_SOCKET would say

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(2.0)


def _bind(address: str | bytes, env_value: str) -> Receiver:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)  # a missing datagram fails the test instead of hanging it
    return Receiver(sock, env_value)


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    if len(os.fsencode(path)) >= 100:  # sun_path holds 108 bytes
        pytest.skip("tmp_path too long for an AF_UNIX address")
    rx = _bind(str(path), str(path))
    yield rx
    rx.sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"gpupool-test-{uuid.uuid4().hex}"
    rx = _bind("\0" + name, "@" + name)
    yield rx
    rx.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    fixture = "path_receiver" if request.param == "path" else "abstract_receiver"
    rx: Receiver = request.getfixturevalue(fixture)
    return rx


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    n = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    assert n.enabled
    yield n
    n.close()


def test_ready_is_one_datagram(receiver: Receiver, notifier: Notifier) -> None:
    assert notifier.ready() is True
    assert receiver.recv() == b"READY=1\n"
    receiver.assert_empty()


def test_each_message_exact(receiver: Receiver, notifier: Notifier) -> None:
    assert notifier.ready(status="serving 2 models")
    assert notifier.status("upgrading resnet to 4")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.stopping(status="draining")
    assert notifier.extend_timeout(2.5)
    assert receiver.recv() == b"READY=1\nSTATUS=serving 2 models\n"
    assert receiver.recv() == b"STATUS=upgrading resnet to 4\n"
    assert receiver.recv() == b"WATCHDOG=1\n"
    assert receiver.recv() == b"STOPPING=1\n"
    assert receiver.recv() == b"STOPPING=1\nSTATUS=draining\n"
    assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=2500000\n"
    receiver.assert_empty()


def test_reloading_carries_monotonic_usec(receiver: Receiver, notifier: Notifier) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.recv().decode().splitlines()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_send_formats_fields_in_order(receiver: Receiver, notifier: Notifier) -> None:
    assert notifier.send(STATUS="line one\nline two", ERRNO=5, READY=True, BUSERROR="x")
    assert receiver.recv() == b"STATUS=line one line two\nERRNO=5\nREADY=1\nBUSERROR=x\n"


def test_send_rejects_bad_field_name(notifier: Notifier) -> None:
    with pytest.raises(ValueError, match="field name"):
        notifier.send(ready=1)


@pytest.mark.parametrize(
    "env",
    [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1"}, {"NOTIFY_SOCKET": "relative/path"}],
)
def test_disabled_is_a_silent_noop(env: dict[str, str]) -> None:
    n = Notifier.from_env(env)
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.reloading() is False
    n.close()


def test_from_env_can_unset(monkeypatch: pytest.MonkeyPatch, path_receiver: Receiver) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.env_value)
    with Notifier.from_env(unset=True) as n:
        assert "NOTIFY_SOCKET" not in os.environ
        assert n.ready()
    assert path_receiver.recv() == b"READY=1\n"


def test_failures_logged_once_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gone"
    caplog.set_level(logging.DEBUG, logger="pool.sdnotify")
    with Notifier(str(path)) as n:
        for _ in range(3):
            assert n.watchdog() is False
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2

        # systemd comes back: the next send works and the recovery is logged ...
        rx = _bind(str(path), str(path))
        try:
            assert n.watchdog() is True
            assert rx.recv() == b"WATCHDOG=1\n"
        finally:
            rx.sock.close()
            path.unlink()
        assert any("reachable again" in r.getMessage() for r in caplog.records)

        # ... and a new outage gets a fresh warning.
        assert n.watchdog() is False
        assert sum(r.levelno == logging.WARNING for r in caplog.records) == 2


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
