"""One bench run's state and services (``Bench``): its work directory, processes, rows,
comparisons and notes; REP workers, a C proxy and pools to measure; and the helpers
several sections share (model files, the page cache, which device a GPU section uses).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from benchkit import (
    Compare,
    Load,
    Pool,
    Procs,
    cpu_seconds,
    mem_available,
    num,
    run_clients,
    start_pool,
    stop_pool,
    wait_ready,
)

WORKER_MEM = 512 << 20  # what one CPU worker may cost, to decide how many fit


class Bench:
    def __init__(self, args: argparse.Namespace, info: dict[str, Any]) -> None:
        self.args = args
        self.info = info
        self.quick: bool = args.quick
        self.seconds: float = args.seconds or (0.5 if args.quick else 3.0)
        self.tmp = args.tmp or tempfile.mkdtemp(prefix="gpb-")
        os.makedirs(self.tmp, exist_ok=True)
        self.procs = Procs(self.dir("logs"))
        self.rows: list[dict[str, Any]] = []
        self.comparisons: list[Compare] = []
        self.notes: list[str] = []

    def dir(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.notes.append(text)

    # ------------------------------------------------------------- services
    @contextlib.contextmanager
    def rep(self, endpoint: str, work: str, n: int, *, bind: bool = False,
            model_path: str = "", copy: bool = True) -> Iterator[list[int]]:
        """``n`` REP workers; yields their pids."""
        p = self.procs.role("rep", {"endpoint": endpoint, "work": work, "n": n, "bind": bind,
                                    "model_path": model_path, "copy": copy, "threads": 1},
                            name=f"rep-{work}")
        try:
            pids = wait_ready(p, n, 180, f"{n} REP worker(s) ({work})")
            time.sleep(0.3)  # let the connects complete
            yield pids
        finally:
            self.procs.kill(p)

    @contextlib.contextmanager
    def proxy(self, front: str, back: str) -> Iterator[list[int]]:
        """The C proxy; yields its pid."""
        p = self.procs.role("proxy", {"front": front, "back": back})
        try:
            yield wait_ready(p, 1, 30, "zmq.proxy")
        finally:
            self.procs.kill(p)

    @contextlib.contextmanager
    def pool(self, name: str, models: list[dict[str, Any]], **opts: Any) -> Iterator[Pool]:
        pool = start_pool(self.procs, self.dir(name), models, **opts)
        try:
            yield pool
        finally:
            stop_pool(self.procs, pool)

    def measure(self, section: str, name: str, endpoint: str, clients: int, load: Load,
                broker: list[int] | None = None, workers: list[int] | None = None,
                **extra: Any) -> dict[str, Any]:
        """One client run; also the CPU time per request of the broker and the workers
        (a figure that a busy machine disturbs less than latency)."""
        cpu0 = [cpu_seconds(broker or []), cpu_seconds(workers or [])]
        row = run_clients(self.procs, self.dir("clients"), endpoint, clients, load)
        cpu = [(cpu_seconds(g or []) - c) / max(1, row["requests"]) * 1e6
               for g, c in zip((broker, workers), cpu0, strict=True)]
        row = {"section": section, "name": name, **extra, **row,
               "broker_cpu_us": cpu[0] if broker else None,
               "workers_cpu_us": cpu[1] if workers else None}
        self.rows.append(row)
        flag = f"  ERRORS {row['errors']}: {row['first_error']}" if row["errors"] else ""
        cpu_text = "".join(f"  {k} {num(v)} us" for k, v in
                           (("broker cpu/req", row["broker_cpu_us"]),
                            ("workers cpu/req", row["workers_cpu_us"])) if v is not None)
        tag = f"r{extra['round']} " if "round" in extra else ""
        print(f"  {tag}{name:<28} {clients:>3} client{'s' if clients > 1 else ' '} "
              f"{num(row['rps']):>8} req/s  p50 {num(row['p50_us']):>7} us  "
              f"p99 {num(row['p99_us']):>7} us{cpu_text}{flag}", flush=True)
        return row

    def compare(self, c: Compare) -> Compare:
        self.comparisons.append(c)
        return c


def default_workers(b: Bench) -> int:
    fit = max(1, min(8, (mem_available() - (1 << 30)) // WORKER_MEM))
    if fit < 8:
        b.note(f"only {fit} CPU workers fit in memory (8 wanted); use --workers N to force")
    return int(fit)


def pool_worker_pids(pool: Pool) -> list[int]:
    return [w["pid"] for m in pool.ctl("status")["data"]["models"] for w in m["workers"]
            if w.get("pid")]


def mlp_files(b: Bench, versions: int, small: bool) -> tuple[list[str], int, int]:
    from benchmodels import MLP_HIDDEN, MLP_LAYERS, make_mlp_versions

    hidden, layers = (512, 4) if small else (MLP_HIDDEN, 2 if b.quick else MLP_LAYERS)
    d = b.dir(f"mlp-{hidden}x{layers}")
    t = time.monotonic()
    paths = make_mlp_versions(d, versions, hidden, layers)
    mib = layers * (hidden * hidden + hidden) * 4 / 2**20
    print(f"  model: {layers} x Linear({hidden}, {hidden}) + ReLU, {mib:.0f} MiB "
          f"(files ready in {time.monotonic() - t:.1f}s)", flush=True)
    return paths, hidden, layers


def preread(paths: list[str]) -> None:
    """Read each file once so that every timed load comes from the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def gpu_device(b: Bench, section: str) -> str | None:
    if b.info["cuda"]:
        return "cuda:0"
    if b.args.cpu_dry_run:
        b.note(f"{section}: CPU dry run with a small model (checks the code path; "
               "not a measurement)")
        return "cpu"
    b.note(f"{section}: skipped, no CUDA device here (--cpu-dry-run runs it on the CPU)")
    return None
