"""What the soak does to the pool: worker kills, a crowd of idle TCP connections, and
upgrades and rollbacks in a loop."""

from __future__ import annotations

import os
import random
import select
import signal
import socket

from soak_tally import Tally
from soak_traffic import MODEL
from stresskit import ModelSet  # (stresskit puts the project root on sys.path)

from pool.ctl.client import ControlClient


def killer(tally: Tally, control: str, every_s: float) -> None:
    """A random worker of the model SIGKILLed every ``every_s`` seconds."""
    ctl = ControlClient(control)
    while not tally.stop.wait(every_s):
        try:
            m = next(m for m in ctl.call("status")["data"]["models"] if m["name"] == MODEL)
            pids = [w["pid"] for w in m["workers"] if w.get("pid")]
        except Exception as exc:  # poold busy or gone: the summary says which
            tally.problem(f"status: {exc}")
            continue
        if pids:
            try:
                os.kill(random.choice(pids), signal.SIGKILL)
                tally.note("workers killed")
            except ProcessLookupError:
                pass


def connections(tally: Tally, port: int, want: int) -> None:
    """Up to ``want`` raw TCP connections held open, 5% closed and reopened every 2 s."""
    held: list[socket.socket] = []
    rng = random.Random(5)
    while not tally.stop.is_set():
        while len(held) < want and not tally.stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                tally.note("connections opened")
            except OSError as exc:
                tally.problem(f"connect: {exc}")
                break
        with tally.lock:
            tally.counts["connections held (max)"] = max(
                tally.counts["connections held (max)"], len(held)
            )
        if tally.stop.wait(2.0):
            break
        # libzmq closes a connection whose handshake has not finished after
        # HANDSHAKE_IVL (30 s): replace those, so that the count stays at poold.
        poller = select.poll()  # select() stops at descriptor 1023
        by_fd = {sock.fileno(): sock for sock in held}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        closed = set()
        for fd, _ in poller.poll(0):
            try:  # poold's ZMTP greeting, read and dropped; b"": it hung up
                if by_fd[fd].recv(4096, socket.MSG_DONTWAIT) == b"":
                    closed.add(by_fd[fd])
            except BlockingIOError:
                pass
            except OSError:
                closed.add(by_fd[fd])
        if closed:
            tally.note("connections closed by poold", len(closed))
            for sock in closed:
                sock.close()
            held = [sock for sock in held if sock not in closed]
        for _ in range(len(held) // 20):  # churn: 5% every 2 s
            held.pop(rng.randrange(len(held))).close()
    for sock in held:
        sock.close()


def upgrades(tally: Tally, control: str, models: ModelSet, every_s: float) -> None:
    """Upgrade to the version not serving, then roll back, and again."""
    ctl = ControlClient(control)
    cycle = 0
    while not tally.stop.wait(every_s):
        cycle += 1
        kind = "upgrade" if cycle % 2 else "rollback"
        try:
            if kind == "upgrade":
                status = ctl.call("status")["data"]
                current = next(m for m in status["models"] if m["name"] == MODEL)["version"]
                i = 1 if current == models.versions[0] else 0
                args = {
                    "model": MODEL,
                    "path": models.paths[i],
                    "version": models.versions[i],
                }
            else:
                args = {"model": MODEL}
            reply = ctl.call(kind, args, timeout_s=120)
        except Exception as exc:
            tally.problem(f"{kind}: {exc}")
            continue
        ok = bool(reply.get("ok"))
        tally.note(f"{kind}s {'committed' if ok else 'failed'}")
        if not ok:
            data = reply.get("data") or {}
            tally.problem(f"{kind}: {data.get('reason') or reply.get('error') or data}")
