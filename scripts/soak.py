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

and with ``--oip`` the HTTP gateway too (scripts/soak_oip.py): ``--oip-clients``
OIP/HTTP keep-alive clients checked like the others, and one peer misbehaving at the
HTTP level in turns (slowloris, a trickled body, requests never read, bytes that are
not HTTP, requests dropped half way). The gateway must keep its pid (poold never had
to restart it) and its descriptors (growth at most ``--max-gateway-fd-growth``).

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
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from soak_faults import connections, killer, upgrades
from soak_oip import gateway_pid, gateway_sample, hostile, oip_client
from soak_tally import Tally
from soak_traffic import MODEL, client, fuzzer, slow_reader
from stresskit import PoolProcess, model_set, proc_stats

from pool.ctl.client import ControlClient

MiB = 1 << 20


class Soak:
    """Every part at once, against one poold, then the verdict."""

    def __init__(
        self, args: argparse.Namespace, pool: PoolProcess, port: int, http_at: str = ""
    ) -> None:
        self.args = args
        self.pool = pool
        self.frontend = f"tcp://127.0.0.1:{port}"
        self.port = port
        self.http_at = http_at  # the OIP/HTTP gateway's address ("": no --oip)
        self.models = model_set(os.path.join(pool.dir, "models"), "small")
        self.tally = Tally()
        self.gateway: int | None = None

    def sample(self) -> dict[str, Any]:
        rss, fds, threads = proc_stats(self.pool.proc.pid)
        out: dict[str, Any] = {"rss": rss, "fds": fds, "threads": threads}
        if self.http_at:
            out["gateway"] = gateway_sample(gateway_pid(self.pool.proc.pid))
        return out

    def oip_jobs(self, a: argparse.Namespace) -> list[Callable[[], None]]:
        if not self.http_at:
            return []
        tally, at, models = self.tally, self.http_at, self.models
        jobs: list[Callable[[], None]] = [lambda: hostile(tally, at, models)]
        for i in range(a.oip_clients):
            jobs.append(lambda i=i: oip_client(tally, at, models, a.request_timeout_s, i))
        return jobs

    def run(self) -> dict[str, Any]:
        ctx: zmq.Context[Any] = zmq.Context()
        a, tally, control = self.args, self.tally, self.pool.control
        jobs: list[Callable[[], None]] = [
            lambda: killer(tally, control, a.kill_every),
            lambda: slow_reader(tally, ctx, self.frontend, self.models),
            lambda: fuzzer(tally, ctx, self.frontend, self.models),
            lambda: connections(tally, self.port, a.connections),
            lambda: upgrades(tally, control, self.models, a.upgrade_every),
            *self.oip_jobs(a),
        ]
        threads = [threading.Thread(target=job, daemon=True) for job in jobs]
        threads += [
            threading.Thread(
                target=client,
                args=(tally, self.frontend, self.models, a.request_timeout_s, i),
                daemon=True,
            )
            for i in range(self.args.clients)
        ]
        seconds = self.args.minutes * 60
        warmup = min(self.args.warmup_s, seconds / 4)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        self.tally.stop.wait(warmup)
        # The start sample comes once the connections are all open (or warm-up doubled),
        # so that it compares like with like.
        while (
            self.tally.counts["connections held (max)"] < self.args.connections
            and time.monotonic() - t0 < 2 * warmup
        ):
            time.sleep(0.1)
        start = self.sample()
        self.tally.stop.wait(max(0.0, seconds - (time.monotonic() - t0)))
        end = self.sample()
        self.tally.stop.set()
        for t in threads:
            t.join(self.args.request_timeout_s + 10)
        ctx.destroy(linger=0)
        time.sleep(self.args.settle_s)
        after = self.sample()
        alive = self.pool.proc.poll() is None
        codes = dict(self.tally.codes)
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
        if self.http_at:
            g0, g1, g2 = start["gateway"], end["gateway"], after["gateway"]
            verdict["gateway_kept"] = g0["pid"] is not None and g0["pid"] == g1["pid"]
            verdict["gateway_fd_growth"] = (
                g2["fds"] - g0["fds"] if g0["fds"] is not None and g2["fds"] is not None else None
            )
            verdict["ok"] = bool(
                verdict["ok"]
                and verdict["gateway_kept"]
                and verdict["gateway_fd_growth"] is not None
                and verdict["gateway_fd_growth"] <= self.args.max_gateway_fd_growth
            )
        return {
            "seconds": round(time.monotonic() - t0, 1),
            "settle_s": self.args.settle_s,
            "requests": requests,
            "answers_by_code": codes,
            "events": dict(self.tally.counts),
            "poold_start": start,
            "poold_end": end,
            "poold_after": after,
            "verdict": verdict,
            "problems": self.tally.problems,
        }


def wait_http_ready(at: str, timeout_s: float = 60.0) -> None:
    import urllib.request

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://{at}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the HTTP gateway on {at} not ready after {timeout_s:.0f} s")


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
    if "gateway_kept" in v:
        g0, g1, g2 = (s[k]["gateway"] for k in ("poold_start", "poold_end", "poold_after"))
        print(
            f"  HTTP gateway: pid {g0['pid']} -> {g1['pid']} (kept: {v['gateway_kept']}); "
            f"RSS {fmt_mb(g0['rss'])} -> {fmt_mb(g1['rss'])}; descriptors {g0['fds']} -> "
            f"{g1['fds']}, {g2['fds']} after the clients left (growth "
            f"{v['gateway_fd_growth']})"
        )
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
    ap.add_argument(
        "--oip", action="store_true", help="the OIP/HTTP gateway too (scripts/soak_oip.py)"
    )
    ap.add_argument("--oip-clients", type=int, default=2, help="OIP/HTTP clients (2)")
    ap.add_argument(
        "--max-gateway-fd-growth",
        type=int,
        default=8,
        help="the gateway's descriptor growth, start to after, that fails the run (8)",
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
    http_at = f"127.0.0.1:{free_port()}" if args.oip else ""
    oip = {"http": http_at, "oip_processes": 1} if args.oip else {}
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
        **oip,
    )
    try:
        pool.wait_serving(ControlClient(pool.control))
        if http_at:
            wait_http_ready(http_at)
        summary = Soak(args, pool, port, http_at).run()
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
