"""The bench's child processes: each started in its own session, its output read with a
timeout, killed by its group id when the bench is done with it (never by name).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES_PY = os.path.join(ROOT, "scripts", "benchroles.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class BenchError(Exception):
    """A step of the bench failed; the message says which and why."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.pop("NOTIFY_SOCKET", None)  # poold must not talk to a systemd that is not ours
    return env


class Procs:
    """The processes this bench started: each in its own session, killed by group."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.live: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def start(self, argv: list[str], *, name: str, stdin: bool = False,
              stdout: bool = True) -> subprocess.Popen[bytes]:
        self.count += 1
        err_path = os.path.join(self.logdir, f"{self.count:03d}-{name}.log")
        with open(err_path, "wb") as err:
            p = subprocess.Popen(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else err, stderr=err,
                start_new_session=True, env=child_env(), cwd=ROOT)
        p.err_path = err_path  # type: ignore[attr-defined]
        p.linebuf = b""  # type: ignore[attr-defined]
        self.live.append(p)
        return p

    def role(self, role: str, cfg: dict[str, Any], *, name: str = "",
             stdin: bool = False) -> subprocess.Popen[bytes]:
        return self.start([sys.executable, ROLES_PY, role, json.dumps(cfg)],
                          name=name or role, stdin=stdin)

    def kill(self, p: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # its session: forked REP workers too
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()
        if p in self.live:
            self.live.remove(p)

    def kill_all(self) -> None:
        for p in list(self.live):
            self.kill(p)


def err_tail(p: subprocess.Popen[bytes], n: int = 3000) -> str:
    try:
        with open(p.err_path, errors="replace") as f:  # type: ignore[attr-defined]
            return f.read()[-n:]
    except OSError:
        return ""


def readline(p: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """One line of a child's stdout, or BenchError when it exits or takes too long."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    end = time.monotonic() + timeout
    while b"\n" not in p.linebuf:  # type: ignore[attr-defined]
        left = end - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what}: no answer within {timeout:.0f}s\n{err_tail(p)}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                p.wait()
                raise BenchError(f"{what}: exited {p.returncode}\n{err_tail(p)}")
            p.linebuf += chunk  # type: ignore[attr-defined]
    line, _, rest = p.linebuf.partition(b"\n")  # type: ignore[attr-defined]
    p.linebuf = rest  # type: ignore[attr-defined]
    return line.decode(errors="replace")


def wait_ready(p: subprocess.Popen[bytes], n: int, timeout: float, what: str) -> list[int]:
    """Wait for ``n`` lines ``ready [PID]``; return the pids given (the process's own else)."""
    end = time.monotonic() + timeout
    pids = []
    for _ in range(n):
        line = readline(p, max(0.1, end - time.monotonic()), what)
        if not line.startswith("ready"):
            raise BenchError(f"{what}: expected 'ready', got {line[:200]!r}")
        rest = line.split()[1:]
        pids.append(int(rest[0]) if rest and rest[0].isdigit() else p.pid)
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total
