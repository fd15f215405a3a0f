#!/usr/bin/env python3
"""bench.py --standby: what a hot standby buys, each figure beside the same run's
figure without one (issue 19's table).

For the 768 MiB MLP, as TorchScript and as the safetensors factory format, one poold
with ``standby = false`` and one with ``standby = true``:

  spawn->ready   surge upgrades (no load): the new worker's spawn_to_ready_s
  drain-first    upgrades under 8 clients: the worst latency of any request that was
                 in flight during the upgrade, and how many failed
  kill -9        (TorchScript) SIGKILL of the only worker under 4 clients: from the
                 kill to the first answer at least 20 ms after it (so from the
                 replacement, not a reply the old worker sent just before it died)

and, in a child process that brought CUDA up as a standby does, the safetensors load
(``workers.weights.load_file``) against a pinned host->device copy of the same bytes.

The clients here are threads of this process using ``router.client.Client`` (what is
measured is hundreds of milliseconds; the GIL's microseconds do not matter).
Also ``python scripts/bench_standby.py load_vs_bus CONFIG_JSON`` (the child's role).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_standby_bus import load_vs_bus, role_load_vs_bus  # noqa: E402
from bench_standby_clients import Clients, wait_serving, wait_standby  # noqa: E402

# The worker's own timings of what follows "go" in a drain-first upgrade (workers.serve).
WORKER_STEPS = ("to_device_s", "load_s", "warm_s", "probe_s", "arenas_s", "main_to_ready_s",
                "ready_delivery_s")
STALE_S = 0.02  # kill -9: answers sooner than this after the kill may be the old worker's


def section_standby(b: Any) -> None:
    from bench_harness import gpu_device, mlp_files, preread
    from benchkit import BenchError, Compare
    from benchmodels import MLP_WARM_BATCHES, make_factory_copy

    from workers.manifest import InputSpec, write_manifest

    dev = gpu_device(b, "standby")
    if dev is None:
        return
    print(f"\n== standby: hot standby against none, on {dev}", flush=True)
    pts, hidden, layers = mlp_files(b, 2, small=dev == "cpu")
    mib = layers * (hidden * hidden + hidden) * 4 / 2**20
    sts = []
    for i, pt in enumerate(pts):
        st = make_factory_copy(pt, b.dir(f"standby-factory-{i}"), hidden, layers)
        # Warm up as the TorchScript versions do, so both formats do the same work.
        write_manifest(os.path.join(os.path.dirname(st), "model.toml"), factory="net.py:build",
                       inputs=[InputSpec("float32", (1, hidden))],
                       warmup_batch_sizes=MLP_WARM_BATCHES)
        sts.append(st)
    preread(pts + sts)
    n = 2 if b.quick else max(3, b.args.upgrades)
    figures: dict[tuple[str, bool], dict[str, list[float]]] = {}
    for fmt, paths in (("safetensors", sts), ("torchscript", pts)):
        for standby in (False, True):
            figures[(fmt, standby)] = run_pool(b, dev, fmt, paths, hidden, standby, n)
    for fmt in ("safetensors", "torchscript"):
        off, on = figures[(fmt, False)], figures[(fmt, True)]
        b.compare(Compare("standby", f"spawn->ready {mib:.0f} MiB {fmt}", "standby",
                          statistics.median(on["s2r"]), "none", statistics.median(off["s2r"]),
                          "s", kind="max", target=0.15 if fmt == "safetensors" else 0.75,
                          note=f"median of {n} surge upgrades"))
        failed = int(sum(on["failed"]))
        b.compare(Compare("standby", f"drain-first {mib:.0f} MiB {fmt}, 8 clients: worst",
                          "standby", max(on["worst"]), "none", max(off["worst"]), "s",
                          kind="max", target=0.30 if fmt == "safetensors" else 0.50,
                          note=f"worst of {n} upgrades; failed {failed} (none: "
                               f"{int(sum(off['failed']))})"))
        if failed:
            raise BenchError(f"{failed} requests failed in drain-first upgrades ({fmt})")
    off, on = figures[("torchscript", False)], figures[("torchscript", True)]
    b.compare(Compare("standby", f"kill -9, {mib:.0f} MiB TorchScript, 4 clients: first "
                      "answer", "standby", statistics.median(on["kill"]), "none",
                      statistics.median(off["kill"]), "s", kind="max", target=0.30,
                      note=f"median of {len(on['kill'])} kills"))
    load_vs_bus(b, dev, sts[0], mib)


def run_pool(b: Any, dev: str, fmt: str, paths: list[str], hidden: int, standby: bool,
             n: int) -> dict[str, list[float]]:
    cfg = {"name": "m", "path": paths[0], "version": "v0", "devices": [dev], "max_batch": 8,
           "max_delay_ms": 1.0}
    if dev == "cpu":
        cfg["threads"] = 1
    out: dict[str, list[float]] = {"s2r": [], "worst": [], "failed": [], "kill": []}
    tag = f"{fmt}, standby {'on' if standby else 'off'}"
    with b.pool(f"standby-{fmt}-{int(standby)}", [cfg], boot_timeout_s=600.0,
                standby=standby, model_roots=[b.tmp]) as pool:
        version = 0

        def upgrade(strategy: str) -> dict[str, Any]:
            nonlocal version
            version += 1
            if standby:
                wait_standby(pool, dev)
            res = pool.ctl("upgrade", {"model": "m", "path": paths[version % 2],
                                       "version": f"v{version}", "strategy": strategy,
                                       "timeout_s": 600.0}, timeout_s=660.0)
            data: dict[str, Any] = res.get("data") or {}
            if not res.get("ok"):
                raise RuntimeError(f"upgrade failed: {res.get('error')} {data}")
            if standby and (data.get("standby") or {}).get("taken") != 1:
                raise RuntimeError(f"the upgrade did not start in the standby: {data}")
            return data

        for _ in range(n):
            data = upgrade("surge")
            wt = data["worker_timings"]
            out["s2r"].append(wt["spawn_to_ready_s"])
            b.rows.append({"section": "standby", "name": f"surge {tag}", **wt})
            print(f"  {tag:<26} surge: spawn->ready {wt['spawn_to_ready_s']:.3f}s "
                  f"(cuda {wt.get('cuda_init_s', 0):.3f}, confine {wt.get('confine_s', 0):.3f}"
                  f", load {wt.get('load_s', 0):.3f}, warm {wt.get('warm_s', 0):.3f}, "
                  f"arenas {wt.get('arenas_s', 0):.3f}; spawn->main {wt.get('to_main_s', 0):.3f}"
                  f", main->ready {wt.get('main_to_ready_s', 0):.3f}, ready event to poold "
                  f"{wt.get('ready_delivery_s', 0):.3f})", flush=True)
        with Clients(pool.frontend, "m", 8, hidden) as load:
            load.wait_answers(50)
            for _ in range(n):
                t0 = time.monotonic()
                data = upgrade("drain-first")
                t1 = time.monotonic()
                load.wait_answers(20)
                worst, reqs, failed = load.window(t0, t1)
                out["worst"].append(worst)
                out["failed"].append(failed)
                b.rows.append({"section": "standby", "name": f"drain-first {tag}",
                               "worst_s": worst, "requests": reqs, "failed": failed,
                               "phases": data.get("phases"), "elapsed_s": data.get("elapsed_s")})
                ph = data.get("phases") or {}
                held = " ".join(f"{k} {ph[k]:.3f}" for k in ("drain_s", "retire_s", "boot_s",
                                                             "held_s") if k in ph)
                wt = data.get("worker_timings") or {}
                steps = " ".join(f"{k.removesuffix('_s')} {wt[k]:.3f}" for k in WORKER_STEPS
                                 if k in wt)
                b.rows[-1]["worker_timings"] = wt
                print(f"  {tag:<26} drain-first: worst latency {worst:.3f}s over {reqs} "
                      f"requests, {failed} failed; upgrade {data.get('elapsed_s')}s "
                      f"{data.get('standby')}; held: {held}; worker after go: {steps}",
                      flush=True)
                staged = f"staged_s {ph['staged_s']:.3f}; " if "staged_s" in ph else ""
                print(f"  {'':<26} {staged}{load.where(t0, t1)}", flush=True)
        if fmt == "torchscript":
            with Clients(pool.frontend, "m", 4, hidden) as load:
                for _ in range(n):
                    if standby:
                        wait_standby(pool, dev)
                    pid = wait_serving(pool)
                    load.wait_answers(20)
                    t = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    # An answer the old worker sent just before it died can still be on
                    # its way for a moment; none from the replacement can be that early.
                    first = load.first_answer_after(t + STALE_S) + STALE_S
                    out["kill"].append(first)
                    new = wait_serving(pool, old_pid=pid)
                    workers = pool.ctl("status")["data"]["models"][0]["workers"]
                    pre = any(w.get("preloaded") for w in workers if w["pid"] == new)
                    b.rows.append({"section": "standby", "name": f"kill {tag}",
                                   "first_answer_s": first, "preloaded": pre})
                    print(f"  {tag:<26} kill -9 [pid {pid}]: first answer after "
                          f"{first:.3f}s (replacement pid {new}"
                          f"{', from the preload' if pre else ''})", flush=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "load_vs_bus":
        sys.exit(role_load_vs_bus(json.loads(sys.argv[2])))
    sys.exit("usage: bench.py --standby (this file's role: load_vs_bus CONFIG_JSON)")
