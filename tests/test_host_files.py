"""The HostFiles port (pool.host_files): the real host's digest off the caller's thread,
and an operation's hashing (pool.operations.digest_then) through the port only."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pool.host_files import LocalFiles
from pool.operations import digest_then
from pool.state import file_digest


def test_the_local_digest_is_the_files_sha256_with_progress(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"weights" * 100_000)
    done = [0]
    got = LocalFiles().digest(str(path), done).result(timeout=30)
    assert got == file_digest(str(path)) and got.startswith("sha256:")


class SlowHost:
    """A host whose hash finishes when the test says, and whose files exist only here."""

    def __init__(self) -> None:
        self.future: Future[str] = Future()
        self.asked: list[str] = []

    def size(self, path: str) -> int:
        return 1000

    def digest(self, path: str, done: list[int]) -> Future[str]:
        self.asked.append(path)
        done[0] = 400
        return self.future


def finish(op: Any) -> str:
    """Send the met wait; the digest the generator returns (it must return now)."""
    try:
        op.send(True)
    except StopIteration as stop:
        return str(stop.value)
    raise AssertionError("digest_then went on waiting")


def test_an_operation_hashes_through_the_port_and_reports_progress() -> None:
    host = SlowHost()
    sup: Any = SimpleNamespace(now=0.0, ports=SimpleNamespace(files=host))
    seen: list[tuple[str, dict[str, Any]]] = []
    op = digest_then(sup, "/nowhere/m.pt", lambda what, **kw: seen.append((what, kw)))
    wait = next(op)
    assert host.asked == ["/nowhere/m.pt"] and not wait.until()
    sup.now = 0.3
    op.send(False)  # still hashing: one progress line, then another wait
    assert seen == [("hashing", {"bytes": 400, "total": 1000, "elapsed_s": 0.3})]
    host.future.set_result("sha256:abc")
    assert finish(op) == "sha256:abc"


def test_a_stop_ends_the_wait_for_the_hash_at_once() -> None:
    """A cancel while the file hashes: digest_then returns "" at its next turn, without
    waiting for the hash (which finishes on its thread, unused)."""
    host = SlowHost()
    sup: Any = SimpleNamespace(now=0.0, ports=SimpleNamespace(files=host))
    cancelled = [False]
    op = digest_then(sup, "/nowhere/m.pt", None, stop=lambda: cancelled[0])
    wait = next(op)
    assert not wait.until()
    cancelled[0] = True
    assert wait.until()  # the scheduler sees the wait met now
    assert finish(op) == ""
    assert not host.future.done()
