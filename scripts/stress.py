"""The leak detector: hundreds of hot updates under load, and proof that nothing leaks.

    python scripts/stress.py --cycles 20 --clients 4 --device cpu --out /tmp/stress
    python scripts/stress.py --cycles 200 --clients 16 --device cuda:0 --model-size 1gib \\
        --strategy surge --out docs/stress/surge
    python scripts/stress.py --mode in-process --device cuda:0 --model-size 1gib --out ...
    python scripts/stress.py --compare docs/stress/surge docs/stress/in-process --out docs/stress

Each cycle moves the model to the other of two versions (every K-th cycle by a rollback)
while client threads send requests without pause, then samples the device, the server
process and its children. Writes samples.csv, summary.json and stress.png to --out and
exits 0 (pass) or 1 (fail). docs/STRESS.md explains every column and every verdict.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stresskit import (  # noqa: E402  (stresskit puts the project root on sys.path)
    InProcess,
    Leftovers,
    MiB,
    PoolProcess,
    Sample,
    child_stats,
    model_set,
    output_problem,
    percentile,
    plot_compare,
    plot_run,
    proc_stats,
    read_csv,
    slope,
    write_csv,
)

from pool.ctl.client import ControlClient, Unreachable  # noqa: E402
from pool.gpu import Gpu, device_index  # noqa: E402
from router.client import Client  # noqa: E402

DRIFT_MAX = 16 * MiB
WARMUP_CYCLES = 3
FD_GROWTH_MAX = 8
THREAD_GROWTH_MAX = 4
Check = dict[str, Any]


# --------------------------------------------------------------------------- verdict
def judge(samples: Sequence[Sample], *, gpu: bool, rss_slope_max: float,
          cycles: int | None = None, warmup: int = WARMUP_CYCLES, drift_max: int = DRIFT_MAX,
          fd_growth_max: int = FD_GROWTH_MAX,
          thread_growth_max: int = THREAD_GROWTH_MAX) -> list[Check]:
    """Every check of a run, each {"name", "ok", "value", "limit", "detail"}."""
    if not samples:
        return [_check("cycles", False, 0, cycles, "no cycle ran")]
    first, last = samples[0], samples[-1]
    ran = [] if cycles is None or len(samples) == cycles else [
        _check("cycles", False, len(samples), cycles,
               f"{len(samples)} of {cycles} cycles ran: the run was cut short")]
    steady = list(samples[warmup:])
    requests = sum(s.requests for s in samples)
    checks = ran + [
        _check("failed requests", last.failed_total == 0 and requests > 0, last.failed_total,
               0, f"{last.failed_total} failed of {requests + last.failed_total}"
               + ("" if requests else " (no request was answered at all)")),
        _check("updates committed", all(s.committed for s in samples),
               sum(not s.committed for s in samples), 0,
               f"{sum(s.committed for s in samples)} of {len(samples)} committed"),
    ]
    if gpu and first.device_used is not None and last.device_used is not None:
        drift = last.device_used - first.device_used
        checks.append(_check("device drift", abs(drift) <= drift_max, drift, drift_max,
                             f"{drift / MiB:+.1f} MiB between cycle {first.cycle} and "
                             f"{last.cycle} (limit {drift_max / MiB:.0f} MiB)"))
    pts = [(s.cycle, s.rss) for s in steady if s.rss is not None]
    if len(pts) >= 2:
        k = slope([c for c, _ in pts], [r for _, r in pts])
        checks.append(_check("RSS slope", k <= rss_slope_max, k, rss_slope_max,
                             f"{k / 1024:+.1f} KiB/cycle over cycles {pts[0][0]}-{pts[-1][0]} "
                             f"(limit {rss_slope_max / 1024:.0f} KiB/cycle)"))
    else:
        checks.append(_check("RSS slope", True, None, rss_slope_max,
                             f"not judged: fewer than 2 cycles after {warmup} of warm-up"))
    ref = samples[min(warmup, len(samples) - 1)]
    for name, key, limit in (("descriptors", "fds", fd_growth_max),
                             ("threads", "threads", thread_growth_max)):
        a, b = getattr(ref, key), getattr(last, key)
        if a is not None and b is not None:
            checks.append(_check(name, b - a <= limit, b - a, limit,
                                 f"{a} at cycle {ref.cycle}, {b} at cycle {last.cycle} "
                                 f"(growth limit {limit})"))
    checks.append(_check("zombies", last.zombies == 0, last.zombies, 0,
                         f"{last.zombies} at the end"))
    checks.append(_check("orphans", last.orphans == 0, last.orphans, 0,
                         f"{last.orphans} at the end"))
    if last.spawner_children is not None:
        stray = last.spawner_children - last.workers
        checks.append(_check("stray children", stray <= 0, stray, 0,
                             f"spawner has {last.spawner_children} children for "
                             f"{last.workers} live workers"))
    return checks


def _check(name: str, ok: bool, value: Any, limit: Any, detail: str) -> Check:
    return {"name": name, "ok": bool(ok), "value": value, "limit": limit, "detail": detail}


# --------------------------------------------------------------------------- load
class Load:
    """Client threads sending without pause; every answer must name a version (and,
    for models this script wrote, carry that version's output)."""

    def __init__(self, endpoint: str, model: str, clients: int, x: np.ndarray,
                 check: Callable[[str, np.ndarray], str | None], timeout_s: float) -> None:
        self.endpoint, self.model, self.x, self.check = endpoint, model, x, check
        self.timeout_s = timeout_s
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.cycle_lat: list[float] = []
        self.all_lat = array.array("d")
        self.failed = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)

    def take(self) -> list[float]:
        """The latencies (ms) of the requests answered since the last call."""
        with self.lock:
            lat, self.cycle_lat = self.cycle_lat, []
        return lat

    def _run(self, idx: int) -> None:
        client = Client(self.endpoint, retries=1, timeout=self.timeout_s)
        try:
            while not self.stop_flag.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.infer(self.model, self.x)
                    problem = self.check(r.version, r.outputs[0] if r.outputs else np.empty(0))
                except Exception as exc:  # PoolError, or anything else: a failed request
                    problem = f"{type(exc).__name__}: {exc}"
                ms = (time.perf_counter() - t0) * 1e3
                with self.lock:
                    if problem:
                        self.failed += 1
                        if len(self.errors) < 20:
                            self.errors.append(f"client {idx}: {problem}")
                    else:
                        self.cycle_lat.append(ms)
                        self.all_lat.append(ms)
        finally:
            client.close()


# --------------------------------------------------------------------------- pool mode
def device_used(gpu: Gpu, idx: int | None) -> int | None:
    mem = gpu.memory(idx) if idx is not None else None
    return mem[0] if mem else None


Run = tuple[list[Sample], list[str], list[float], list[Check]]  # + errors, latencies (ms)


def run_pool(args: argparse.Namespace, work: str, emit: Callable[[Sample], None]) -> Run:
    gpu = Gpu()
    pool: PoolProcess | None = None
    if args.control is None:
        models = model_set(args.models_dir or os.path.join(work, "models"), args.model_size)
        paths: list[str] = list(models.paths)
        version_of: dict[str, str] = dict(zip(paths, models.versions, strict=True))
        name, x = "stress", models.x
        idx = device_index(args.device)
        base = device_used(gpu, idx)
        leftovers = Leftovers(())  # taken before poold exists: the baseline is the host's
        model: dict[str, Any] = {"name": name, "path": paths[0],
                                 "version": models.versions[0], "devices": [args.device],
                                 "max_batch": 8, "max_delay_ms": 1.0}
        if idx is None:  # OpenMP threads spinning on a small CPU box starve the clients
            model["threads"] = 1
        opts = {"standby": True} if args.standby else {"standby": False}
        pool = PoolProcess(os.path.join(work, "pool"), model, **opts)
        ctl = ControlClient(pool.control)
        try:
            pool.wait_serving(ctl)
        except BaseException:
            pool.stop()
            raise
        frontend = pool.frontend

        def check(version: str, out: np.ndarray) -> str | None:
            return output_problem(models.refs, version, out)
    else:
        ctl, frontend, name = ControlClient(args.control), args.frontend, args.model
        paths = [os.path.realpath(p) for p in args.paths]
        status = ctl.call("status")["data"]
        m = next((m for m in status["models"] if m["name"] == name), None)
        if m is None:
            raise SystemExit(f"poold at {args.control} serves no model named {name!r}")
        version_of = {os.path.realpath(m["path"]): m["version"]}
        idx = next((device_index(d) for d in m["devices"] if device_index(d) is not None), None)
        live = {w["pid"] for w in m["workers"]}
        used = device_used(gpu, idx)
        procs = (gpu.process_bytes(idx) if idx is not None else None) or {}
        base = None if used is None else used - sum(procs.get(p, 0) for p in live)
        leftovers = Leftovers(())
        leftovers.baseline -= live
        leftovers.remember(live)
        x = attach_input(paths[0], args.input_shape)

        def check(version: str, out: np.ndarray) -> str | None:
            return None if version else "the answer names no version"

    load = Load(frontend, name, args.clients, x, check, args.request_timeout)
    load.start()
    samples: list[Sample] = []
    t0 = time.monotonic()
    try:
        for cycle in range(1, args.cycles + 1):
            try:
                s = pool_cycle(args, cycle, ctl, name, paths, version_of, gpu, idx, base,
                               leftovers, load, t0)
            except (Unreachable, TimeoutError) as exc:
                print(f"stress: cycle {cycle}: poold stopped answering: {exc}", file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(f"stress: interrupted in cycle {cycle}", file=sys.stderr)
                break
            samples.append(s)
            emit(s)
            if pool is not None and pool.proc.poll() is not None:
                break
            time.sleep(args.dwell)
    finally:
        load.stop()
        extra = []
        if pool is not None:
            pool.stop()
            extra.append(after_shutdown(leftovers))
    return samples, load.errors, list(load.all_lat), extra


def pool_cycle(args: argparse.Namespace, cycle: int, ctl: ControlClient, name: str,
               paths: list[str], version_of: dict[str, str], gpu: Gpu, idx: int | None,
               base: int | None, leftovers: Leftovers, load: Load, t0: float) -> Sample:
    before = model_status(ctl.call("status")["data"], name)
    cur = os.path.realpath(before["path"]) if before else paths[0]
    target = paths[1] if cur == paths[0] else paths[0]
    rollback = bool(args.rollback_every) and cycle % args.rollback_every == 0
    call: dict[str, Any] = {"model": name, "strategy": args.strategy,
                            "timeout_s": args.update_timeout}
    if rollback:
        if target in version_of:
            call["to"] = version_of[target]
    else:
        call["path"] = target
        if target in version_of:
            call["version"] = version_of[target]
    retired: dict[str, int | None] = {}

    def progress(msg: dict[str, Any]) -> None:
        if msg.get("phase") == "retired" and idx is not None:
            retired["used"] = device_used(gpu, idx)
            procs = gpu.process_bytes(idx) or {}
            retired["serving"] = sum(b for p, b in procs.items() if p not in leftovers.baseline)

    error = ""
    t_call = time.monotonic()
    try:
        reply = ctl.call("rollback" if rollback else "upgrade", call,
                         timeout_s=args.update_timeout + 30, progress=progress)
    except (Unreachable, TimeoutError) as exc:
        reply, error = {"ok": False, "data": {}}, str(exc)
    t_sample = time.monotonic()
    data = reply.get("data") or {}
    committed = bool(reply.get("ok")) and data.get("outcome") == "committed"
    if not committed and not error:
        error = str(reply.get("error") or data.get("reason") or "not committed")
    if committed and data.get("to_version"):
        version_of[target] = str(data["to_version"])
    try:
        status = standby_status(ctl, args) if args.standby else ctl.call("status")["data"]
    except (Unreachable, TimeoutError) as exc:
        status, error = {}, error or str(exc)
    m = model_status(status, name) or {}
    workers = m.get("workers", [])
    live = {int(w["pid"]) for w in workers if w.get("pid")}
    # A hot standby is a spawner child with a CUDA context and no model: expected, and
    # left out of the device level the drift check compares (pool.standby).
    standbys = {int(sb["pid"]) for sb in (status.get("standby") or {}).get("standbys", [])
                if sb.get("pid")}
    if args.standby and committed and data.get("standby", {}).get("taken") != 1:
        error = error or f"the update did not start in the standby: {data.get('standby')}"
    live |= standbys
    leftovers.remember([*live, *data.get("pids_started", []), *data.get("pids_stopped", [])])
    # NVML now, by the pids status names: status's own gpu_bytes is refreshed every few
    # seconds and can be one taken while the new worker was still loading.
    procs = (gpu.process_bytes(idx) if idx is not None else None) or {}
    wgpu: list[int | None] = [procs.get(w["pid"], w.get("gpu_bytes")) for w in workers]
    gpu_sum = sum(v for v in wgpu if v is not None) if wgpu and None not in wgpu else None
    poold, spawner = status.get("pid"), status.get("spawner_pid")
    rss, fds, threads = proc_stats(poold)
    kids, z1 = child_stats(poold)
    skids, z2 = child_stats(spawner)
    if skids is not None:
        skids -= len(standbys)
    zombies, orphans = leftovers.check(live, [p for p in (poold, spawner) if p])
    lat = load.take()
    used_r = retired.get("used")
    residue = None
    if used_r is not None and base is not None:
        residue = used_r - base - (retired.get("serving") or 0)
    freed = data.get("bytes_freed") or {}
    return Sample(
        cycle=cycle, t_s=round(time.monotonic() - t0, 3),
        action="rollback" if rollback else "upgrade", strategy=str(data.get("strategy", "")),
        version=str(data.get("to_version", "")), committed=committed,
        elapsed_s=data.get("elapsed_s"), call_s=round(t_sample - t_call, 3),
        sample_s=round(time.monotonic() - t_sample, 3),
        bytes_freed=sum(freed.values()) if freed else None,
        device_used=level(gpu, idx, standbys, procs), device_retired=used_r, residue=residue,
        workers_gpu_bytes=gpu_sum,
        workers=len(workers), rss=rss, fds=fds, threads=threads, children=kids,
        spawner_children=skids, zombies=len(z1 | z2 | zombies), orphans=len(orphans),
        requests=len(lat), failed_total=load.failed, p50_ms=rounded(percentile(lat, 50)),
        p99_ms=rounded(percentile(lat, 99)), max_ms=rounded(max(lat, default=None)),
        error=error[:300])


def standby_status(ctl: ControlClient, args: argparse.Namespace) -> dict[str, Any]:
    """Status once the standby behind the last update waits (30 s at most), so that
    every sample sees the same set of processes."""
    end = time.monotonic() + 30.0
    while True:
        status: dict[str, Any] = ctl.call("status")["data"]
        waiting = [sb for sb in status.get("standby", {}).get("standbys", [])
                   if sb.get("state") == "waiting" and sb.get("device") == args.device]
        if waiting or time.monotonic() > end:
            return status
        time.sleep(0.05)


def level(gpu: Gpu, idx: int | None, standbys: set[int], procs: dict[int, int]) -> int | None:
    """Device used minus the standbys' own bytes (read now, with ``procs`` for the rest)."""
    used = device_used(gpu, idx)
    if used is None or not standbys:
        return used
    now = (gpu.process_bytes(idx) if idx is not None else None) or procs
    return used - sum(now.get(p, 0) for p in standbys)


def rounded(v: float | None, places: int = 3) -> float | None:
    return None if v is None else round(v, places)


def model_status(status: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in status.get("models", []) if m["name"] == name), None)


def attach_input(path: str, shape: str | None) -> np.ndarray:
    """An input for a model this script did not write: its manifest's, or --input-shape."""
    from workers.manifest import load_manifest  # numpy and the standard library only

    dtype, dims = "float32", [1, 16]
    manifest = load_manifest(path)
    if shape:
        dims = [int(d) for d in shape.split(",")]
    elif manifest is not None and manifest.inputs:
        dtype, dims = manifest.inputs[0].dtype, list(manifest.inputs[0].shape)
    return np.random.default_rng(0).random(dims).astype(dtype)


def after_shutdown(leftovers: Leftovers, grace_s: float = 10.0) -> Check:
    """After poold stopped, nothing it started may be left running."""
    end = time.monotonic() + grace_s
    while True:
        zombies, orphans = leftovers.check(set())
        if not (zombies or orphans) or time.monotonic() > end:
            break
        time.sleep(0.2)
    left = sorted(zombies | orphans)
    for pid, proc in leftovers.seen.items():  # our pool's workers: do not leave them behind
        if pid in left:
            try:
                proc.kill()
            except Exception:
                pass
    return _check("after shutdown", not left, len(left), 0,
                  f"{len(left)} processes left {grace_s:.0f}s after poold stopped"
                  + (f": pids {left}" if left else ""))


# --------------------------------------------------------------------------- in-process
def run_inprocess(args: argparse.Namespace, work: str, emit: Callable[[Sample], None]) -> Run:
    gpu = Gpu()
    idx = device_index(args.device)
    models = model_set(args.models_dir or os.path.join(work, "models"), args.model_size)
    base = device_used(gpu, idx)
    leftovers = Leftovers(())
    server = InProcess(args.device, args.clients, models.dir)
    leftovers.expected.add(server.pid)
    samples: list[Sample] = []
    failed = 0
    errors: list[str] = []
    lat: list[float] = []
    t0 = time.monotonic()
    try:
        server.call("load", path=models.paths[0], version=models.versions[0])
        server.call("stats")  # drop what the first load saw
        cur = 0
        for cycle in range(1, args.cycles + 1):
            cur = 1 - cur
            t_call = time.monotonic()
            before = device_used(gpu, idx)
            try:
                out = server.call("unload")
                emptied = device_used(gpu, idx)
                back = server.call("load", path=models.paths[cur], version=models.versions[cur])
                st = server.call("stats")
            except RuntimeError as exc:  # the server died (an exception in it, OOM, ...)
                print(f"stress: cycle {cycle}: {exc}", file=sys.stderr)
                break
            except KeyboardInterrupt:
                print(f"stress: interrupted in cycle {cycle}", file=sys.stderr)
                break
            failed += st["failed"]
            errors += st["errors"][: 20 - len(errors)]
            lat += st["latencies_ms"]
            t_sample = time.monotonic()
            rss, fds, threads = proc_stats(server.pid)
            kids, zkids = child_stats(server.pid)
            zombies, orphans = leftovers.check({server.pid})
            procs = (gpu.process_bytes(idx) if idx is not None else None) or {}
            rollback = bool(args.rollback_every) and cycle % args.rollback_every == 0
            s = Sample(
                cycle=cycle, t_s=round(time.monotonic() - t0, 3),
                action="rollback" if rollback else "swap", strategy="in-process",
                version=models.versions[cur], committed=bool(out["ok"] and back["ok"]),
                elapsed_s=round(out["unload_s"] + back["load_s"], 3),
                call_s=round(t_sample - t_call, 3),
                sample_s=round(time.monotonic() - t_sample, 3),
                bytes_freed=None if before is None or emptied is None else before - emptied,
                device_used=device_used(gpu, idx), device_retired=emptied,
                residue=None if emptied is None or base is None else emptied - base,
                workers_gpu_bytes=procs.get(server.pid), workers=1, rss=rss, fds=fds,
                threads=threads, children=kids, spawner_children=None,
                zombies=len(zkids | zombies), orphans=len(orphans), requests=st["requests"],
                failed_total=failed, p50_ms=rounded(st["p50_ms"]),
                p99_ms=rounded(st["p99_ms"]),
                max_ms=rounded(max(st["latencies_ms"], default=None)))
            samples.append(s)
            emit(s)
            time.sleep(args.dwell)
    finally:
        server.stop()
    return samples, errors, lat, []


# --------------------------------------------------------------------------- output
def fmt_bytes(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:.1f}M"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def progress_line(s: Sample, cycles: int) -> str:
    w = len(str(cycles))
    el = "-" if s.elapsed_s is None else f"{s.elapsed_s:.2f}s"
    return (f"[{s.cycle:>{w}}/{cycles}] {s.action:<8} -> {s.version[:12]:<4} "
            f"{s.strategy:<11} {'ok ' if s.committed else 'NOT'} {el:>6} "
            f"freed {fmt_bytes(s.bytes_freed)} | dev {fmt_bytes(s.device_used)} "
            f"res {fmt_bytes(s.residue)} wgpu {fmt_bytes(s.workers_gpu_bytes)} | "
            f"rss {fmt_bytes(s.rss)} fds {s.fds} thr {s.threads} kids {s.children}/"
            f"{'-' if s.spawner_children is None else s.spawner_children} | "
            f"zomb {s.zombies} orph {s.orphans} | req {s.requests} fail {s.failed_total} "
            f"p50 {fmt_ms(s.p50_ms)} p99 {fmt_ms(s.p99_ms)} max {fmt_ms(s.max_ms)}"
            + (f" | {s.error}" if s.error else ""))


def stats(values: Sequence[float | int | None]) -> dict[str, float | None]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "p50": None, "max": None, "min": None}
    return {"mean": float(np.mean(v)), "p50": float(np.median(v)), "max": max(v), "min": min(v)}


def summarize(args: argparse.Namespace, samples: list[Sample], checks: list[Check],
              errors: list[str], lat: list[float], wall_s: float) -> dict[str, Any]:
    ok = all(c["ok"] for c in checks)
    by = {c["name"]: c for c in checks}
    last = samples[-1] if samples else None
    return {
        "verdict": "pass" if ok else "fail",
        "pass": ok,
        "mode": args.mode,
        "strategy": args.strategy if args.mode == "pool" else "in-process",
        "standby": bool(args.standby),
        "device": args.device,
        "model_size": args.model_size,
        "cycles": len(samples),
        "clients": args.clients,
        "rollback_every": args.rollback_every,
        "requests": sum(s.requests for s in samples),
        "failed_requests": last.failed_total if last else 0,
        "errors": errors,
        "zombies": last.zombies if last else None,
        "orphans": last.orphans if last else None,
        "rss_slope_bytes_per_cycle": by.get("RSS slope", {}).get("value"),
        "rss_slope_max": args.rss_slope_max,
        "device_drift_bytes": by.get("device drift", {}).get("value"),
        "updates_committed": sum(s.committed for s in samples),
        "updates_not_committed": sum(not s.committed for s in samples),
        "update_s": stats([s.elapsed_s for s in samples]),
        "call_s": stats([s.call_s for s in samples]),
        "cycle_s": (samples[-1].t_s - samples[0].t_s) / (len(samples) - 1)
        if len(samples) > 1 else None,
        "bytes_freed": stats([s.bytes_freed for s in samples]),
        "residue_bytes": stats([s.residue for s in samples]),
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                       "max": max(lat, default=None)},
        "checks": checks,
        "machine": machine(),
        "wall_s": round(wall_s, 1),
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["gpus"] = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                        for i in range(pynvml.nvmlDeviceGetCount())]
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        info["gpus"] = []
    return info


def print_verdict(summary: dict[str, Any], out: Any) -> None:
    how = "in-process swap" if summary["mode"] == "in-process" else summary["strategy"]
    print(f"verdict: {summary['verdict'].upper()} ({how}, {summary['cycles']} cycles, "
          f"{summary['requests']} requests)", file=out)
    for c in summary["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']:<18} {c['detail']}", file=out)


def compare(dirs: Sequence[str], out_dir: str) -> int:
    runs = []
    for d in dirs:
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
        label = (f"gpu-pool ({summary['strategy']})" if summary["mode"] == "pool"
                 else "in-process swap")
        runs.append((label, read_csv(os.path.join(d, "samples.csv")), summary))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compare.png")
    plot_compare([(label, samples) for label, samples, _ in runs], path)
    for label, samples, summary in runs:
        res = summary["residue_bytes"]
        print(f"{label:<26} {summary['cycles']:>4} cycles  drift "
              f"{fmt_bytes(summary['device_drift_bytes'])}  residue last "
              f"{fmt_bytes(samples[-1].residue if samples else None)} max "
              f"{fmt_bytes(res['max'])}  RSS slope "
              f"{(summary['rss_slope_bytes_per_cycle'] or 0) / 1024:+.1f} KiB/cycle  "
              f"{summary['verdict']}")
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="stress.py", description=__doc__.split("\n\n")[0],
        epilog="See docs/STRESS.md.")
    ap.add_argument("--mode", choices=("pool", "in-process"), default="pool")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--strategy", choices=("surge", "drain-first", "auto"), default="auto")
    ap.add_argument("--rollback-every", type=int, default=0, metavar="K",
                    help="every K-th cycle is a rollback instead of an upgrade (0: never)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    ap.add_argument("--standby", action="store_true",
                    help="run poold with a hot standby (standby = true; default: false) and "
                         "check that every update starts in it")
    ap.add_argument("--model-size", choices=("small", "1gib"), default="small")
    ap.add_argument("--models-dir", help="where the two model versions are written (and "
                    "reused by later runs); default: a temporary directory")
    ap.add_argument("--out", default="stress-out", help="directory for the outputs")
    ap.add_argument("--rss-slope-max", type=float, default=256 * 1024,
                    metavar="BYTES_PER_CYCLE")
    ap.add_argument("--dwell", type=float, default=0.0, metavar="S",
                    help="seconds of plain serving after each cycle (default 0: back to back)")
    ap.add_argument("--update-timeout", type=float, default=120.0, metavar="S")
    ap.add_argument("--request-timeout", type=float, default=60.0, metavar="S")
    ap.add_argument("--json", action="store_true",
                    help="print summary.json on stdout (progress lines go to stderr)")
    ap.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                    help="draw two runs' memory on one chart (--out/compare.png)")
    at = ap.add_argument_group("attach to a running poold (instead of starting one)")
    at.add_argument("--control", metavar="ENDPOINT")
    at.add_argument("--frontend", metavar="ENDPOINT")
    at.add_argument("--model", metavar="NAME")
    at.add_argument("--paths", nargs=2, metavar=("A", "B"))
    at.add_argument("--input-shape", metavar="N,D,...",
                    help="float32 input shape when the model has no manifest")
    args = ap.parse_args(argv)
    if args.control and not (args.frontend and args.model and args.paths):
        ap.error("--control needs --frontend, --model and --paths A B")
    if args.control and args.mode == "in-process":
        ap.error("--mode in-process starts its own server; it cannot attach")
    if args.cycles < 1 or args.clients < 1 or args.rollback_every < 0:
        ap.error("--cycles and --clients must be >= 1, --rollback-every >= 0")
    if args.device != "cpu" and device_index(args.device) is None:
        ap.error(f"--device must be cpu or cuda:N, got {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out)
    log = sys.stderr if args.json else sys.stdout
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-pool-stress-")

    def emit(s: Sample) -> None:
        print(progress_line(s, args.cycles), file=log, flush=True)

    def interrupted(signum: int, frame: object) -> None:
        # A SIGTERM (e.g. from `timeout`) ends the run like Ctrl-C does: the cycle loop
        # stops, its poold is shut down, and what was sampled so far is written.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.monotonic()
    try:
        runner = run_pool if args.mode == "pool" else run_inprocess
        samples, errors, lat, extra = runner(args, work, emit)
    except (RuntimeError, Unreachable, subprocess.CalledProcessError) as exc:
        print(f"stress: could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checks = judge(samples, gpu=True, rss_slope_max=args.rss_slope_max,
                   cycles=args.cycles) + extra
    if args.standby and args.mode == "pool" and args.control is None:
        cold = [s.cycle for s in samples if "standby" in s.error]
        checks.append(_check("started in the standby", not cold, len(cold), 0,
                             f"{len(samples) - len(cold)} of {len(samples)} updates"
                             + (f"; not in cycles {cold[:10]}" if cold else "")))
    summary = summarize(args, samples, checks, errors, lat, time.monotonic() - t0)
    write_csv(os.path.join(args.out, "samples.csv"), samples)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    title = (f"{summary['mode']} ({summary['strategy']}), {args.model_size} model on "
             f"{args.device}, {args.clients} clients: {summary['verdict'].upper()}")
    plot_run(samples, os.path.join(args.out, "stress.png"), title,
             "poold" if args.mode == "pool" else "server")
    if errors:
        print("first failures:\n  " + "\n  ".join(errors[:5]), file=log)
    print_verdict(summary, log)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
