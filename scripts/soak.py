#!/usr/bin/env python3
"""Soak a private poold on the CPU with everything that went wrong in issue 17, at once.

For ``--minutes`` (default 10), against a small two-version MLP on two CPU workers:

  load         ``--clients`` REQ clients (router.client) sending without pause; every
               answer is checked against the version that claims it
  kills        a random worker SIGKILLed every ``--kill-every`` seconds (1)
  slow reader  one DEALER that sends requests and never reads a reply
  connections  up to ``--connections`` (2,000) raw TCP connections held open, some
               closed and reopened every few seconds (capped below ``ulimit -n``)
  fuzz         a DEALER sending mutated requests (bytes flipped, frames cut, dropped,
               added, wrong protocol id); answers counted, never required
  upgrades     upgrade to the other version, then a rollback, in a loop

It prints the requests, the failures by error code (an error code is an answer: the
pool said what happened), the requests *lost* (no answer at all before the client gave
up: the client waits past the deadline the pool enforces), and poold's RSS and open
descriptors near the start (after ``--warmup-s``) and at the end, with everything still
running. Exit 0 when nothing was lost, poold stayed up and its RSS grew by at most
``--max-rss-growth-mb``; 1 otherwise; 2 for bad arguments.

MODEL_UNAVAILABLE may appear among the codes: a worker killed every second can trip the
restart-storm guard (5 failures in 120 s mark the model failed, pool/flapping.py) until
the next upgrade or rollback clears it. That is the guard doing its job. Upgrades and
rollbacks fail now and then too (the killer hits the new version's workers): counted
under events, they are no failure of the soak.

The summary also samples poold a few seconds after every client has gone (``after``):
what the slow reader's held replies cost comes back then, or not.

Examples:
  scripts/soak.py                       # the full 10 minutes
  scripts/soak.py --minutes 0.1 --json  # a few seconds, one JSON summary on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq
from stresskit import PoolProcess, model_set, output_problem, proc_stats

from pool.ctl.client import ControlClient
from router.client import Client
from router.client_codec import encode_request
from router.errors import PoolError, RequestTimeout

MODEL = "soak"
MiB = 1 << 20


class Soak:
    def __init__(self, args: argparse.Namespace, pool: PoolProcess, port: int) -> None:
        self.args = args
        self.pool = pool
        self.frontend = f"tcp://127.0.0.1:{port}"
        self.port = port
        self.models = model_set(os.path.join(pool.dir, "models"), "small")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.codes: Counter[str] = Counter()  # OK, error codes, LOST, WRONG
        self.problems: list[str] = []
        self.counts: Counter[str] = Counter()  # kills, fuzz, slow reader, upgrades ...

    # ------------------------------------------------------------------ pieces
    def note(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def problem(self, text: str) -> None:
        with self.lock:
            if len(self.problems) < 20:
                self.problems.append(text)

    def client(self, idx: int) -> None:
        c = Client(self.frontend, retries=1, timeout=self.args.request_timeout_s)
        try:
            while not self.stop.is_set():
                try:
                    r = c.infer(MODEL, self.models.x)
                    wrong = output_problem(self.models.refs, r.version, r.outputs[0])
                    code = "WRONG" if wrong else "OK"
                    if wrong:
                        self.problem(f"client {idx}: {wrong}")
                except RequestTimeout as exc:
                    code = "LOST"
                    self.problem(f"client {idx}: {exc}")
                except PoolError as exc:
                    code = exc.code
                with self.lock:
                    self.codes[code] += 1
        finally:
            c.close()

    def killer(self) -> None:
        ctl = ControlClient(self.pool.control)
        while not self.stop.wait(self.args.kill_every):
            try:
                m = next(m for m in ctl.call("status")["data"]["models"] if m["name"] == MODEL)
                pids = [w["pid"] for w in m["workers"] if w.get("pid")]
            except Exception as exc:  # poold busy or gone: the summary says which
                self.problem(f"status: {exc}")
                continue
            if pids:
                try:
                    os.kill(random.choice(pids), signal.SIGKILL)
                    self.note("workers killed")
                except ProcessLookupError:
                    pass

    def dealer(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.frontend)
        return s

    def slow_reader(self, ctx: zmq.Context[Any]) -> None:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 1)  # never read: push back into poold at once
        s.setsockopt(zmq.RCVBUF, 4096)
        s.connect(self.frontend)
        frames = [b"", *encode_request(MODEL, (self.models.x,), 2000)]
        try:
            while not self.stop.wait(0.002):
                try:
                    s.send_multipart(frames, zmq.NOBLOCK)
                    self.note("slow reader sent")
                except zmq.Again:
                    pass
        finally:
            s.close(0)

    def fuzzer(self, ctx: zmq.Context[Any]) -> None:
        s = self.dealer(ctx)
        good = [bytes(f) for f in encode_request(MODEL, (self.models.x,), 1000)]
        rng = random.Random(17)
        try:
            while not self.stop.wait(0.02):
                s.send_multipart([b"", *mutate(good, rng)])
                self.note("fuzz sent")
                while s.poll(0):
                    s.recv_multipart()
                    self.note("fuzz answered")
        finally:
            s.close(0)

    def connections(self) -> None:
        want = self.args.connections
        held: list[socket.socket] = []
        rng = random.Random(5)
        while not self.stop.is_set():
            while len(held) < want and not self.stop.is_set():
                try:
                    held.append(socket.create_connection(("127.0.0.1", self.port), timeout=2))
                    self.note("connections opened")
                except OSError as exc:
                    self.problem(f"connect: {exc}")
                    break
            with self.lock:
                self.counts["connections held (max)"] = max(
                    self.counts["connections held (max)"], len(held)
                )
            if self.stop.wait(2.0):
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
                self.note("connections closed by poold", len(closed))
                for sock in closed:
                    sock.close()
                held = [sock for sock in held if sock not in closed]
            for _ in range(len(held) // 20):  # churn: 5% every 2 s
                held.pop(rng.randrange(len(held))).close()
        for sock in held:
            sock.close()

    def upgrades(self) -> None:
        """Upgrade to the version not serving, then roll back, and again."""
        ctl = ControlClient(self.pool.control)
        cycle = 0
        while not self.stop.wait(self.args.upgrade_every):
            cycle += 1
            kind = "upgrade" if cycle % 2 else "rollback"
            try:
                if kind == "upgrade":
                    status = ctl.call("status")["data"]
                    current = next(m for m in status["models"] if m["name"] == MODEL)["version"]
                    i = 1 if current == self.models.versions[0] else 0
                    args = {
                        "model": MODEL,
                        "path": self.models.paths[i],
                        "version": self.models.versions[i],
                    }
                else:
                    args = {"model": MODEL}
                reply = ctl.call(kind, args, timeout_s=120)
            except Exception as exc:
                self.problem(f"{kind}: {exc}")
                continue
            ok = bool(reply.get("ok"))
            self.note(f"{kind}s {'committed' if ok else 'failed'}")
            if not ok:
                data = reply.get("data") or {}
                self.problem(f"{kind}: {data.get('reason') or reply.get('error') or data}")

    def sample(self) -> dict[str, int | None]:
        rss, fds, threads = proc_stats(self.pool.proc.pid)
        return {"rss": rss, "fds": fds, "threads": threads}

    # -------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        ctx: zmq.Context[Any] = zmq.Context()
        jobs: list[Callable[[], None]] = [
            self.killer,
            lambda: self.slow_reader(ctx),
            lambda: self.fuzzer(ctx),
            self.connections,
            self.upgrades,
        ]
        threads = [threading.Thread(target=job, daemon=True) for job in jobs]
        threads += [
            threading.Thread(target=self.client, args=(i,), daemon=True)
            for i in range(self.args.clients)
        ]
        seconds = self.args.minutes * 60
        warmup = min(self.args.warmup_s, seconds / 4)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        self.stop.wait(warmup)
        # The start sample comes once the connections are all open (or warm-up doubled),
        # so that it compares like with like.
        while (
            self.counts["connections held (max)"] < self.args.connections
            and time.monotonic() - t0 < 2 * warmup
        ):
            time.sleep(0.1)
        start = self.sample()
        self.stop.wait(max(0.0, seconds - (time.monotonic() - t0)))
        end = self.sample()
        self.stop.set()
        for t in threads:
            t.join(self.args.request_timeout_s + 10)
        ctx.destroy(linger=0)
        time.sleep(self.args.settle_s)
        after = self.sample()
        alive = self.pool.proc.poll() is None
        codes = dict(self.codes)
        requests = sum(codes.values())
        growth = (end["rss"] or 0) - (start["rss"] or 0)
        verdict = {
            "lost": codes.get("LOST", 0),
            "wrong": codes.get("WRONG", 0),
            "poold_alive": alive,
            "rss_growth_mb": round(growth / MiB, 1),
            "rss_growth_limit_mb": self.args.max_rss_growth_mb,
        }
        verdict["ok"] = (
            verdict["lost"] == 0
            and verdict["wrong"] == 0
            and alive
            and start["rss"] is not None
            and growth <= self.args.max_rss_growth_mb * MiB
        )
        return {
            "seconds": round(time.monotonic() - t0, 1),
            "settle_s": self.args.settle_s,
            "requests": requests,
            "answers_by_code": codes,
            "events": dict(self.counts),
            "poold_start": start,
            "poold_end": end,
            "poold_after": after,
            "verdict": verdict,
            "problems": self.problems,
        }


def mutate(good: list[bytes], rng: random.Random) -> list[bytes]:
    """One fuzzed request: a valid one with something broken."""
    frames = list(good)
    how = rng.randrange(6)
    if how == 0:  # flip bytes in one frame
        i = rng.randrange(len(frames))
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        frames[i] = bytes(b)
    elif how == 1:  # cut a frame short
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif how == 2 and len(frames) > 1:  # drop a frame
        frames.pop(rng.randrange(len(frames)))
    elif how == 3:  # an extra frame of noise
        frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randrange(64)))
    elif how == 4:  # another protocol id
        frames[0] = rng.choice([b"gpu-pool/2", b"", b"GPU-POOL/1", rng.randbytes(10)])
    else:  # noise alone
        frames = [rng.randbytes(rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
    return frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connection_budget(wanted: int) -> int:
    """Raise our soft descriptor limit to the hard one; keep 300 for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return max(0, min(wanted, soft - 300))


def fmt_mb(v: int | None) -> str:
    return "?" if v is None else f"{v / MiB:.1f} MiB"


def print_summary(s: dict[str, Any]) -> None:
    v = s["verdict"]
    print(f"soak: {s['seconds']} s, {s['requests']} requests")
    print(
        "  answers by code: "
        + ", ".join(f"{k} {n}" for k, n in sorted(s["answers_by_code"].items()))
    )
    print(f"  lost (never answered): {v['lost']}; wrong answers: {v['wrong']}")
    print("  events: " + ", ".join(f"{k} {n}" for k, n in sorted(s["events"].items())))
    a, b = s["poold_start"], s["poold_end"]
    print(
        f"  poold RSS: {fmt_mb(a['rss'])} -> {fmt_mb(b['rss'])} "
        f"(growth {v['rss_growth_mb']} MiB, limit {v['rss_growth_limit_mb']})"
    )
    print(
        f"  poold descriptors: {a['fds']} -> {b['fds']}; threads: {a['threads']} -> {b['threads']}"
    )
    c = s["poold_after"]
    print(
        f"  poold {s['settle_s']} s after the clients left: RSS {fmt_mb(c['rss'])}, "
        f"descriptors {c['fds']}"
    )
    print(f"  poold alive at the end: {v['poold_alive']}")
    for p in s["problems"][:10]:
        print(f"  problem: {p}")
    print("PASS" if v["ok"] else "FAIL")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    ap.add_argument("--clients", type=int, default=4, help="REQ clients checking answers (4)")
    ap.add_argument("--kill-every", type=float, default=1.0, help="seconds between kills (1)")
    ap.add_argument("--connections", type=int, default=2000, help="TCP connections held (2000)")
    ap.add_argument(
        "--upgrade-every", type=float, default=5.0, help="seconds between upgrades/rollbacks (5)"
    )
    ap.add_argument(
        "--request-timeout-s",
        type=float,
        default=10.0,
        help="each request's deadline; past it plus a margin it is lost (10)",
    )
    ap.add_argument(
        "--warmup-s",
        type=float,
        default=30.0,
        help="chaos runs this long before the start sample (30; at most a quarter)",
    )
    ap.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=64.0,
        help="poold RSS growth from start to end sample that fails the run (64)",
    )
    ap.add_argument(
        "--settle-s",
        type=float,
        default=5.0,
        help="wait after the clients left before the last sample (5)",
    )
    ap.add_argument(
        "--unread-mb",
        type=int,
        default=4,
        help="poold's max_unread_reply_mb: what the slow reader may hold (4: reached in "
        "the warm-up, so that RSS after it must stay flat)",
    )
    ap.add_argument("--dir", help="work directory, kept (default: a temporary one, removed)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary, nothing else")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.kill_every <= 0:
        ap.error("--minutes, --kill-every must be > 0 and --clients >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.connections = connection_budget(args.connections)
    work = args.dir or tempfile.mkdtemp(prefix="soak-", dir="/tmp")
    port = free_port()
    models = model_set(os.path.join(work, "models"), "small")
    model = {
        "name": MODEL,
        "path": models.paths[0],
        "version": models.versions[0],
        "devices": ["cpu", "cpu"],
        "threads": 1,
    }
    pool = PoolProcess(
        work,
        model,
        frontend=f"tcp://127.0.0.1:{port}",
        heartbeat_interval_s=1.0,
        heartbeat_timeout_s=5.0,
        max_unread_reply_mb=args.unread_mb,
    )
    try:
        pool.wait_serving(ControlClient(pool.control))
        summary = Soak(args, pool, port).run()
    finally:
        rc = pool.stop()
        if not args.dir:  # our own temporary directory: nothing in it is wanted later
            shutil.rmtree(work, ignore_errors=True)
    summary["poold_exit"] = rc
    summary["dir"] = args.dir or ""
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print_summary(summary)
    return 0 if summary["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
