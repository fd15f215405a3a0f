"""The stress run's baseline: the classic in-process swap (``stress_inproc``), sampled
after each cycle the way the pool run is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from stress_run_pool import device_used, rounded
from stress_verdict import Run
from stresskit import (  # (stresskit puts the project root on sys.path)
    InProcess,
    Leftovers,
    Sample,
    child_stats,
    model_set,
    proc_stats,
)

from pool.gpu import Gpu, device_index


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
