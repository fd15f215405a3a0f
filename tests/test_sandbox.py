"""The worker sandbox (workers.sandbox), each case applied in a forked child of the test.

A child restricts only itself, reports what it could and could not do through a pipe,
and exits; the test process stays unconfined. Cases that need Landlock skip with the
kernel's reason where it has none.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workers import landlock, seccomp
from workers.sandbox import SandboxError, SandboxPolicy, apply, worker_policy

ABI, WHY = landlock.abi_version()
needs_landlock = pytest.mark.skipif(ABI < 1, reason=WHY or "no Landlock")
needs_net = pytest.mark.skipif(ABI < 4, reason=f"Landlock ABI {ABI} has no TCP rules (6.7+)")
needs_scopes = pytest.mark.skipif(ABI < 6, reason=f"Landlock ABI {ABI} has no scoping (6.12+)")
needs_seccomp = pytest.mark.skipif(seccomp.arch() is None, reason="no filter for this arch")

DENIED = (errno.EACCES, errno.EPERM)


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in a forked child and return what it returned (or its error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = body()
        except BaseException as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, Any] = json.loads(b"".join(chunks))
    return result


def attempt(action: Callable[[], object]) -> str:
    """The errno name an action failed with, or "ok"."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def read(path: str | Path) -> Callable[[], bytes]:
    return lambda: Path(path).read_bytes()


def tcp_connect(port: int) -> Callable[[], None]:
    def go() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass

    return go


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A model root with a file, a run directory, and a secret beside them."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "weights.bin").write_bytes(b"weights")
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for models")
    yield {"root": root, "run": run, "secret": secret}


@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


@needs_landlock
def test_worker_policy_confines_files_and_network(tree: dict[str, Path], listener: int) -> None:
    assert attempt(tcp_connect(listener)) == "ok"  # the port answers unconfined

    def body() -> dict[str, Any]:
        policy = worker_policy([str(tree["root"])], str(tree["run"]), "cpu")
        report = apply(policy, True)
        out = tree["run"] / "scratch"
        return {
            "report": report.to_wire(),
            "root": attempt(read(tree["root"] / "weights.bin")),
            "passwd": attempt(read("/etc/passwd")),
            "secret": attempt(read(tree["secret"])),
            "write_run": attempt(lambda: out.write_bytes(b"x")),
            "write_root": attempt(lambda: (tree["root"] / "new").write_bytes(b"x")),
            "tcp": attempt(tcp_connect(listener)),
            "udp": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
            "import": attempt(lambda: __import__("colorsys")),
            "statm": attempt(read("/proc/self/statm")),
            "parent_environ": attempt(read(f"/proc/{os.getppid()}/environ")),
        }

    got = in_child(body)
    assert "error" not in got, got
    assert got["root"] == "ok"
    assert got["passwd"] in ("EACCES", "EPERM")
    assert got["secret"] in ("EACCES", "EPERM")
    assert got["write_run"] == "ok"
    assert got["write_root"] in ("EACCES", "EPERM")
    assert got["tcp"] in ("EACCES", "EPERM")
    assert got["import"] == "ok"  # the Python installation stays readable
    assert got["statm"] == "ok"  # the worker's RSS report reads its own /proc entry
    assert got["parent_environ"] in ("EACCES", "EPERM")
    report = got["report"]
    assert report["applied"] and report["fs"] and report["no_new_privs"]
    assert report["landlock_abi"] == ABI
    assert report["threads"] == ("all" if ABI >= 8 else "main")
    if seccomp.arch() is not None:
        assert report["seccomp"] and report["net"] == "denied"
        assert got["udp"] in ("EACCES", "EPERM")  # Landlock alone has no UDP rule


@needs_net
def test_landlock_alone_denies_tcp_connect(tree: dict[str, Path], listener: int) -> None:
    """Without the seccomp filter, the Landlock TCP rule (ABI 4) refuses the connect
    itself: the socket is created, the connection is not."""

    def body() -> dict[str, Any]:
        landlock.set_no_new_privs()
        landlock.restrict(ABI, SandboxPolicy((str(tree["root"]),)).grants())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            return {"connect": attempt(lambda: sock.connect(("127.0.0.1", listener)))}
        finally:
            sock.close()

    assert in_child(body) == {"connect": "EACCES"}


@needs_seccomp
def test_seccomp_alone_allows_only_unix_sockets(tmp_path: Path) -> None:
    """The fallback where the kernel has no Landlock: no inet socket at all, unix
    sockets (poold's ipc endpoints) still work, files are not confined."""
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def body() -> dict[str, Any]:
        landlock.set_no_new_privs()
        seccomp.deny_network()
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return {
            "inet": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "inet6": attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)),
            "unix": attempt(lambda: unix.connect(path)),
            "file": attempt(read("/etc/hostname")),
        }

    try:
        got = in_child(body)
    finally:
        server.close()
    assert got["inet"] == "EACCES" and got["inet6"] == "EACCES"
    assert got["unix"] == "ok"
    assert got["file"] in ("ok", "ENOENT")


@needs_landlock
def test_unix_sockets_under_the_sandbox(tree: dict[str, Path]) -> None:
    """A worker's link to poold is a unix socket with a path (backend, lane): it still
    connects. An abstract socket outside the domain does not, from ABI 6 on."""
    path = str(tree["run"].parent / "backend.sock")
    named = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    named.bind(path)
    named.listen(1)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0gpu-pool-test-{os.getpid()}"
    abstract.bind(name)
    abstract.listen(1)

    def body() -> dict[str, Any]:
        apply(worker_policy([str(tree["root"])], str(tree["run"]), "cpu"))
        out = {}
        for key, address in (("named", path), ("abstract", name)):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            out[key] = attempt(lambda: sock.connect(address))  # noqa: B023
            sock.close()
        out["signal_parent"] = attempt(lambda: os.kill(os.getppid(), 0))
        out["signal_self"] = attempt(lambda: os.kill(os.getpid(), 0))
        return out

    try:
        got = in_child(body)
    finally:
        named.close()
        abstract.close()
    assert got["named"] == "ok"
    assert got["signal_self"] == "ok"
    if ABI >= 6:
        assert got["abstract"] == "EPERM"
        assert got["signal_parent"] == "EPERM"
    else:
        assert got["abstract"] == "ok"


def test_off_changes_nothing(tree: dict[str, Path]) -> None:
    def body() -> dict[str, Any]:
        report = apply(worker_policy([str(tree["root"])], str(tree["run"]), "cpu"), False)
        return {"report": report.to_wire(), "secret": attempt(read(tree["secret"]))}

    got = in_child(body)
    assert got["secret"] == "ok"
    assert got["report"]["applied"] is False and got["report"]["reason"] == "sandbox = false"


@needs_seccomp
def test_without_landlock_auto_falls_back_and_true_refuses(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without Landlock (simulated): "auto" keeps the network rule through
    seccomp and says why files are open; "true" refuses with the kernel's reason."""
    monkeypatch.setattr(landlock, "abi_version", lambda: (0, "the kernel has no Landlock"))
    policy = worker_policy([str(tree["root"])], str(tree["run"]), "cpu")

    def auto() -> dict[str, Any]:
        report = apply(policy, "auto")
        return {"report": report.to_wire(), "secret": attempt(read(tree["secret"]))}

    def required() -> dict[str, Any]:
        try:
            apply(policy, True)
        except SandboxError as exc:
            return {"refused": str(exc)}
        return {"refused": ""}

    got = in_child(auto)
    report = got["report"]
    assert report["applied"] and not report["fs"] and report["seccomp"]
    assert report["net"] == "denied" and "no Landlock" in report["reason"]
    assert got["secret"] == "ok"
    assert "no Landlock" in in_child(required)["refused"]


def test_filter_jumps_land_inside_the_program() -> None:
    for a in seccomp.ARCHES.values():
        prog = seccomp.program(a)
        for i, (code, jt, jf, _) in enumerate(prog):
            if code in (seccomp.JEQ_K, seccomp.JGE_K):
                assert i + 1 + max(jt, jf) < len(prog)
        assert prog[-1] == (seccomp.RET_K, 0, 0, seccomp.RET_ALLOW)
