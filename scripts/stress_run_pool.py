"""The stress run against a pool: a private poold (or a running one, attached to), one
upgrade or rollback per cycle under load, and a sample of the device, poold, the
spawner and their children after each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from stress_load import Load
from stress_verdict import Check, Run, check
from stresskit import (  # (stresskit puts the project root on sys.path)
    Leftovers,
    PoolProcess,
    Sample,
    child_stats,
    model_set,
    output_problem,
    percentile,
    proc_stats,
)

from pool.ctl.client import ControlClient, Unreachable
from pool.gpu import Gpu, device_index


def device_used(gpu: Gpu, idx: int | None) -> int | None:
    mem = gpu.memory(idx) if idx is not None else None
    return mem[0] if mem else None


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
    return check("after shutdown", not left, len(left), 0,
                  f"{len(left)} processes left {grace_s:.0f}s after poold stopped"
                  + (f": pids {left}" if left else ""))
