"""The spawn section (CUDA): worker spawn -> ready in upgrades, against the floor measured
inside the worker and a cold ``python -c`` process.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from bench_harness import Bench, gpu_device, mlp_files, preread
from benchkit import (
    BenchError,
    Compare,
    readline,
)
from benchroles import COLD_CODE


def section_spawn(b: Bench) -> None:
    dev = gpu_device(b, "spawn")
    if dev is None:
        return
    print(f"\n== spawn: worker start on {dev}", flush=True)
    paths, hidden, layers = mlp_files(b, 2, small=dev == "cpu")
    mib = layers * (hidden * hidden + hidden) * 4 / 2**20
    preread(paths)
    colds = []
    for i in range(b.args.cold_runs):
        cfg = {"path": paths[0], "device": dev, "hidden": hidden, "batch_sizes": [1, 64, 512]}
        t0 = time.monotonic()
        p = b.procs.start([sys.executable, "-c", COLD_CODE, json.dumps(cfg)], name="cold")
        try:
            phases = json.loads(readline(p, 600, "cold process"))
        finally:
            wall = time.monotonic() - t0
            b.procs.kill(p)
        row = {"section": "spawn", "name": f"cold {i}", "wall_s": wall, **phases}
        b.rows.append(row)
        colds.append(wall)
        print(f"  cold python -c #{i}: {wall:.3f}s (import {phases['import_s']:.3f}, cuda "
              f"{phases['cuda_init_s']:.3f}, load {phases['load_s']:.3f}, warm "
              f"{phases['warm_s']:.3f})", flush=True)
    cfg = {"name": "mlp", "path": paths[0], "version": "u0", "devices": [dev], "max_batch": 1}
    s2r, floors = [], []
    with b.pool("spawn-pool", [cfg], boot_timeout_s=600.0) as pool:
        for i in range(b.args.upgrades):
            res = pool.ctl("upgrade", {"model": "mlp", "path": paths[(i + 1) % 2],
                                       "version": f"u{i + 1}", "strategy": "auto",
                                       "timeout_s": 600.0}, timeout_s=660.0)
            data = res.get("data") or {}
            if not res.get("ok"):
                raise BenchError(f"upgrade {i + 1} failed: {res.get('error')} {data}")
            wt = data["worker_timings"]
            floor = sum(wt.get(k, 0.0) for k in ("cuda_init_s", "load_s", "warm_s"))
            s2r.append(wt["spawn_to_ready_s"])
            floors.append(floor)
            b.rows.append({"section": "spawn", "name": f"upgrade {i + 1}", "floor_s": floor,
                           "strategy": data.get("strategy"), "elapsed_s": data.get("elapsed_s"),
                           **wt})
            print(f"  upgrade {i + 1} ({data.get('strategy')}): spawn->ready "
                  f"{wt['spawn_to_ready_s']:.3f}s, floor {floor:.3f}s (cuda "
                  f"{wt.get('cuda_init_s', 0):.3f} + load {wt.get('load_s', 0):.3f} + warm "
                  f"{wt.get('warm_s', 0):.3f}), overhead {wt['spawn_to_ready_s'] - floor:+.3f}s;"
                  f" upgrade took {data.get('elapsed_s')}s", flush=True)
    over = statistics.median(s - f for s, f in zip(s2r, floors, strict=True))
    floor_m = statistics.median(floors)
    b.compare(Compare("spawn", f"spawn->ready {mib:.0f} MiB, median of {len(s2r)}", "pool",
                      statistics.median(s2r), "floor in worker", floor_m, "s", kind="diff",
                      target=0.15, note=f"median per-upgrade overhead {over:+.3f} s"))
    b.compare(Compare("spawn", f"cold start {mib:.0f} MiB, median of {len(colds)}",
                      "python -c",
                      statistics.median(colds), "floor in worker", floor_m, "s",
                      note="import torch + CUDA init + load + warm-up"))
