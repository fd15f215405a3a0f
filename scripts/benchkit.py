"""Plumbing for scripts/bench.py: child processes, client runs, a real poold, the table.

Every process the bench starts gets its own session and is killed by its group id when
the bench is done with it (or when the bench itself exits), never by name.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
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


# ------------------------------------------------------------------ processes
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


# -------------------------------------------------------------------- clients
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


# ----------------------------------------------------------------------- pool
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
            if data["models"] and all(
                m["status"] == "serving" and m["workers"]
                and all(w["state"] == "ready" for w in m["workers"]) for m in data["models"]):
                return pool
        except Exception:  # not listening yet
            pass
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


# ---------------------------------------------------------------- the machine
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": "", "mem_gib": 0.0, "gpus": [], "driver": "",
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f
                                      if ln.startswith("model name")), "")
        info["mem_gib"] = round(mem_available() / 2**30, 1)
    except OSError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = _s(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
            info["gpus"].append(f"{_s(pynvml.nvmlDeviceGetName(h))} ({mem / 2**30:.0f} GiB)")
    except Exception:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            rows = [r.split(", ") for r in out.stdout.strip().splitlines() if r.strip()]
            info["gpus"] = [f"{r[0]} ({r[1]})" for r in rows if len(r) >= 3]
            info["driver"] = rows[0][2] if rows and len(rows[0]) >= 3 else ""
        except (OSError, subprocess.SubprocessError):
            pass
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda or ""
    info["cuda"] = bool(torch.cuda.is_available())  # no context: the bench never computes here
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:
        info["torchvision"] = ""
    return info


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) * 1024
    return 0


def print_machine(info: dict[str, Any]) -> None:
    gpus = ", ".join(info["gpus"]) or "none"
    print(f"date {info['date']}  host {info['host']}  python {info['python']}")
    print(f"cpu  {info['cpus']} cores ({info['cpus_usable']} usable) {info['cpu_model']}; "
          f"{info['mem_gib']} GiB available; load average {info['loadavg'][0]:.2f} (1 min)")
    print(f"gpu  {gpus}{'  driver ' + info['driver'] if info['driver'] else ''}; "
          f"torch {info['torch']} (cuda {info['torch_cuda'] or 'none'}, "
          f"available: {info['cuda']}); torchvision {info['torchvision'] or 'absent'}")


# --------------------------------------------------------------------- output
@dataclass
class Compare:
    """One figure next to its same-run reference."""

    section: str
    figure: str
    name: str
    value: float
    ref_name: str
    ref: float
    unit: str
    kind: str = "ratio"  # "ratio": value/ref >= target; "diff": value-ref <= target;
    # "max": value <= target (an absolute target; ref is shown beside it)
    target: float | None = None
    note: str = ""

    @property
    def result(self) -> float:
        if self.kind == "diff":
            return self.value - self.ref
        if self.kind == "max":
            return self.value
        return self.value / self.ref if self.ref else math.nan

    @property
    def met(self) -> bool | None:
        if self.target is None or not math.isfinite(self.result):
            return None
        return self.result >= self.target if self.kind == "ratio" else self.result <= self.target

    def shown(self) -> str:
        """The result as printed. Where the usual rounding would show the target itself
        while missing it (0.7998x against 0.8x), more digits are shown."""
        r = self.result
        prec = 2 if self.kind == "ratio" else _prec(self.unit)
        if self.met is False and self.target is not None:
            while prec < 6 and round(r, prec) == round(self.target, prec):
                prec += 1
        if self.kind == "max":
            return f"{r:.{prec}f} {self.unit}"
        return f"{r:.{prec}f}x" if self.kind == "ratio" else f"{r:+.{prec}f} {self.unit}"

    def row(self) -> list[str]:
        res = self.shown()
        tgt = "" if self.target is None else (
            f">= {self.target:g}x" if self.kind == "ratio" else
            f"<= {self.target:g} {self.unit}" if self.kind == "max" else
            f"<= {self.target:+g} {self.unit}")
        met = {None: "", True: "yes", False: "NO"}[self.met]
        return [self.section, self.figure, f"{self.name} {num(self.value)} {self.unit}",
                f"{self.ref_name} {num(self.ref)} {self.unit}", res, tgt, met, self.note]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "result": self.result, "met": self.met}


def _prec(unit: str) -> int:
    return 3 if unit == "s" else 0 if unit in ("us", "ms") else 1


def num(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if a >= 0.01 else f"{v:.2g}"


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def print_compare(title: str, comps: list[Compare]) -> None:
    print_table(title, ["section", "figure", "value", "reference (same run)", "ratio/diff",
                        "target", "met", "note"], [c.row() for c in comps])
