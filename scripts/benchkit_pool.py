"""A real poold for a bench section, and the client processes that load it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from benchkit_procs import BenchError, Procs, readline, wait_ready


@dataclass
class Load:
    """What each client sends and for how long."""

    dtype: str
    shape: list[int]
    model: str = "m"
    seconds: float = 3.0
    requests: int = 0  # > 0: exactly this many per client instead of ``seconds``
    warm: int = 3
    min_requests: int = 1
    check_identity: bool = False
    startup_timeout_s: float = 180.0


def run_clients(procs: Procs, tmp: str, endpoint: str, clients: int, load: Load) -> dict[str, Any]:
    """``clients`` client processes, released together; their merged numbers."""
    os.makedirs(tmp, exist_ok=True)
    base = {"endpoint": endpoint, "model": load.model, "dtype": load.dtype,
            "shape": load.shape, "warm": load.warm, "requests": load.requests,
            "min_requests": load.min_requests, "check_identity": load.check_identity}
    outs = [os.path.join(tmp, f"lat-{i}.bin") for i in range(clients)]
    ps = [procs.role("client", {**base, "out": outs[i]}, name="client", stdin=True)
          for i in range(clients)]
    try:
        end = time.monotonic() + load.startup_timeout_s
        for p in ps:
            wait_ready(p, 1, max(1.0, end - time.monotonic()), "client start-up/warm-up")
        deadline = time.monotonic() + load.seconds
        for p in ps:
            assert p.stdin is not None
            p.stdin.write(f"go {deadline!r}\n".encode())
            p.stdin.flush()
        budget = (load.seconds if not load.requests else 0) + 600.0
        results = [json.loads(readline(p, budget, "client run")) for p in ps]
        for p in ps:
            p.wait(30)
    finally:
        for p in ps:
            procs.kill(p)
    lat = np.concatenate([np.fromfile(o, dtype=np.float64) for o in outs])
    n = int(sum(r["n"] for r in results))
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    errors = int(sum(r["errors"] for r in results))
    first = next((r["first_error"] for r in results if r["first_error"]), "")
    return {"clients": clients, "requests": n, "errors": errors, "first_error": first,
            "wall_s": wall, "rps": n / wall if wall > 0 else math.nan,
            "p50_us": float(np.percentile(lat, 50) * 1e6),
            "p99_us": float(np.percentile(lat, 99) * 1e6),
            "mean_us": float(lat.mean() * 1e6)}


@dataclass
class Pool:
    dir: str
    frontend: str
    control: str
    proc: subprocess.Popen[bytes]
    log: str
    models: list[dict[str, Any]] = field(default_factory=list)

    def ctl(self, cmd: str, args: dict[str, Any] | None = None,
            timeout_s: float | None = None) -> dict[str, Any]:
        from pool.ctl.client import ControlClient

        return ControlClient(self.control).call(cmd, args, timeout_s=timeout_s)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


def start_pool(procs: Procs, tmp: str, models: list[dict[str, Any]],
               boot_timeout_s: float = 180.0, **pool_opts: Any) -> Pool:
    """Write a config, start ``python -m pool.poold`` and wait until every worker is ready."""
    os.makedirs(tmp, mode=0o700, exist_ok=True)
    socks = tmp
    if len(tmp.encode()) > 80:  # ipc paths are limited to 107 bytes
        socks = tempfile.mkdtemp(prefix="gpb-", dir="/tmp")
    opts = {"frontend": f"ipc://{socks}/front.sock", "control": f"ipc://{socks}/ctl.sock",
            "state_dir": f"{tmp}/state", "metrics": "", "log_level": "WARNING",
            "boot_timeout_s": boot_timeout_s, **pool_opts}
    from pool.tomlwrite import write_config

    config = write_config(os.path.join(tmp, "pool.toml"), opts, models)
    proc = procs.start([sys.executable, "-m", "pool.poold", "--config", config],
                       name="poold", stdout=False)
    pool = Pool(tmp, opts["frontend"], opts["control"], proc, proc.err_path,  # type: ignore[attr-defined]
                models)
    end = time.monotonic() + boot_timeout_s + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"poold exited {proc.returncode}:\n{pool.log_tail()}")
        try:
            data = pool.ctl("status")["data"]
        except Exception:  # not listening yet
            data = None
        if data is not None:
            if data["models"] and all(
                m["status"] == "serving" and m["workers"]
                and all(w["state"] == "ready" for w in m["workers"]) for m in data["models"]):
                return pool
            # A model whose restarts gave up will not serve: say so now, not at the timeout.
            failed = [m["name"] for m in data["models"] if m["status"] == "failed"]
            if failed:
                raise BenchError(f"model(s) {', '.join(failed)} failed to start:\n"
                                 f"{pool.log_tail()}")
        if time.monotonic() > end:
            raise BenchError(f"poold not serving after {boot_timeout_s:.0f}s:\n{pool.log_tail()}")
        time.sleep(0.1)


def stop_pool(procs: Procs, pool: Pool) -> None:
    """SIGTERM (drain, stop workers), then the group kill; workers die with the lifeline."""
    if pool.proc.poll() is None:
        pool.proc.send_signal(signal.SIGTERM)
        try:
            pool.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    procs.kill(pool.proc)
    socks = os.path.dirname(pool.frontend.removeprefix("ipc://"))
    if pool.frontend.startswith("ipc://") and socks != pool.dir:  # start_pool's short dir
        shutil.rmtree(socks, ignore_errors=True)
