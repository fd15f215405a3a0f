"""poold's side of the preloaded spawner (``workers.spawner``).

Spawning never blocks the loop: a spawn request is one small write, and the pid comes
back later as a message on the spawner's stdout, which the loop polls. While the spawner
imports torch (seconds) requests wait in a list. If the spawner dies it is restarted and
the requests it had not answered are reported as failed spawns.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from itertools import count
from typing import Any

from pool.host_memory import with_host_hugepages
from workers.spawner import MessageReader, write_message

log = logging.getLogger(__name__)

SpawnedCallback = Callable[[int, int], None]  # token, pid
ExitedCallback = Callable[[int, int], None]  # pid, raw wait status
FailedCallback = Callable[[int, str], None]  # token, reason
MessageCallback = Callable[[dict[str, Any]], None]  # "took", "standby_ready", "preloaded"


class SpawnerClient:
    def __init__(
        self,
        lifeline_fd: int,
        on_spawned: SpawnedCallback,
        on_exited: ExitedCallback,
        on_failed: FailedCallback,
        on_message: MessageCallback | None = None,
    ) -> None:
        self.lifeline_fd = lifeline_fd
        self.on_spawned = on_spawned
        self.on_exited = on_exited
        self.on_failed = on_failed
        self.on_message = on_message
        self.proc: subprocess.Popen[bytes] | None = None
        # Where the spawner and its workers write stderr: None inherits poold's; a
        # pool.logs.StderrRelay pipe turns their lines into log records (JSON, journal).
        self.child_stderr: int | None = None
        self.ready = False
        self.reader = MessageReader()
        self.backlog: list[dict[str, Any]] = []  # spawns asked before the spawner said hello
        self.unanswered: dict[int, dict[str, Any]] = {}
        self.tokens = count(1)
        self.restarts = 0
        self.next_start = 0.0
        self.import_s = 0.0
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        env = with_host_hugepages(os.environ)  # see pool.host_memory
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.spawner", str(self.lifeline_fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.child_stderr,
            pass_fds=(self.lifeline_fd,),
            env=env,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.ready = False
        self.reader = MessageReader()
        log.info("spawner started [pid %d]; importing torch", self.proc.pid)

    def fileno(self) -> int | None:
        if self.proc is None or self.proc.stdout is None:
            return None
        return self.proc.stdout.fileno()

    def spawn(self, spec: dict[str, Any]) -> int:
        """Fork a worker; returns the token its "spawned" answer will carry."""
        return self._ask({"t": "spawn", "spec": spec})

    def standby(self, spec: dict[str, Any]) -> int:
        """Fork a standby for ``spec["device"]`` (``workers.standby``)."""
        return self._ask({"t": "standby", "spec": spec})

    def take(self, pid: int | None, standby_token: int, spec: dict[str, Any]) -> int:
        """Make a standby the worker ``spec``: the one with ``pid``, or (pid not known yet)
        the one forked for ``standby_token``. A fresh fork if that standby is gone."""
        return self._ask({"t": "take", "pid": pid, "standby": standby_token, "spec": spec})

    def _ask(self, msg: dict[str, Any]) -> int:
        token = next(self.tokens)
        msg["token"] = token
        if self.ready:
            self._send(msg)
        else:
            self.backlog.append(msg)
        return token

    def _send(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            write_message(self.proc.stdin.fileno(), msg)
            self.unanswered[msg["token"]] = msg
        except OSError as exc:
            log.error("spawner unreachable: %s", exc)
            self.backlog.append(msg)

    def handle_readable(self) -> bool:
        """Read what the spawner said. Returns False when its pipe closed (it died)."""
        fd = self.fileno()
        if fd is None:
            return False
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._lost()
            return False
        for msg in self.reader.feed(data):
            kind = msg.get("t")
            if kind == "hello":
                self.ready = True
                self.import_s = float(msg.get("import_s", 0.0))
                log.info("spawner ready [pid %s] (import %.2fs)", msg.get("pid"), self.import_s)
                backlog, self.backlog = self.backlog, []
                for m in backlog:
                    self._send(m)
            elif kind == "spawned":
                token = int(msg.get("token") or 0)
                self.unanswered.pop(token, None)
                self.on_spawned(token, int(msg["pid"]))
            elif kind == "exited":
                self.on_exited(int(msg["pid"]), int(msg["status"]))
            elif kind in ("took", "standby_ready", "preloaded") and self.on_message is not None:
                self.on_message(msg)
        return True

    def _lost(self) -> None:
        log.error("spawner [pid %s] went away; restarting it", self.pid)
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
        self.proc = None
        self.ready = False
        lost, self.unanswered = self.unanswered, {}
        for token in lost:
            self.on_failed(token, "the spawner died before starting this worker")
        self.restarts += 1
        # Back off a little if it keeps dying, but never stop trying: nothing spawns without it.
        self.next_start = time.monotonic() + min(30.0, 0.5 * 2 ** min(self.restarts, 6))

    def maybe_restart(self, now: float) -> bool:
        if self.proc is None and now >= self.next_start:
            self.start()
            return True
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: the spawner exits on its own
        except OSError:
            pass
