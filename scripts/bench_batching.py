"""The batching section (CUDA + torchvision): batch-1 clients through the pool against
the same scripted model called in-process at batch 64 (and at batch 1).
"""

from __future__ import annotations

import json
import os
import time

from bench_harness import Bench, gpu_device, pool_worker_pids
from bench_worker_cpu import cpu_ticks, us_per_request
from benchkit import (
    Compare,
    Load,
    num,
    readline,
)


def section_batching(b: Bench) -> None:
    dev = gpu_device(b, "batching")
    if dev is None:
        return
    resnet = dev != "cpu"
    if resnet and not b.info["torchvision"]:
        b.note("batching: skipped, torchvision is not installed")
        return
    from benchmodels import make_image_model

    a = b.args
    image = 224 if resnet else 32
    half = dev != "cpu"
    dtype = "float16" if half else "float32"
    clients = a.batch_clients if resnet else min(8, a.batch_clients)
    what = "resnet50 fp16 (scripted)" if resnet else "small CNN fp32 (dry run)"
    print(f"\n== batching: {what} on {dev}, {clients} clients x batch-1 requests, "
          f"max_batch 64, max_delay_ms {a.batch_delay_ms:g}", flush=True)
    t = time.monotonic()
    path = make_image_model(os.path.join(b.dir("batching"), "net.pt"), resnet=resnet,
                            half=half, image=image)
    print(f"  scripted in {time.monotonic() - t:.1f}s", flush=True)
    seconds = b.seconds if b.quick else max(b.seconds, 5.0)
    p = b.procs.role("direct_batch", {"path": path, "device": dev, "dtype": dtype,
                                      "shape": [1, 3, image, image], "batch_sizes": [1, 64],
                                      "seconds": min(seconds, 3.0)})
    try:
        direct = {r["batch"]: r for r in json.loads(readline(p, 600, "direct batch run"))}
    finally:
        b.procs.kill(p)
    for bs, r in direct.items():
        b.rows.append({"section": "batching", "name": f"direct batch {bs}", **r})
        print(f"  direct in-process batch {bs:>2}: {num(r['images_per_s'])} images/s "
              f"({r['ms_per_batch']:.2f} ms a batch)", flush=True)
    cfg = {"name": "net", "path": path, "devices": [dev], "max_batch": 64,
           "max_delay_ms": a.batch_delay_ms, "request_timeout_s": 120.0}
    load = Load(dtype, [1, 3, image, image], model="net", seconds=seconds, warm=5)
    # The target row replays CUDA graphs (cuda_graphs = true, what a GPU deployment of a
    # batched model sets); the ordinary forward is measured beside it for information.
    variants = [("pool (1 worker, CUDA graphs)", True)] if resnet else []
    variants.append(("pool (1 worker)", False))
    rows = {}
    for name, graphs in variants:
        port = free_port()
        with b.pool(f"batching-pool-{int(graphs)}", [{**cfg, "cuda_graphs": graphs}],
                    boot_timeout_s=600.0, metrics=f"127.0.0.1:{port}") as pool:
            before = batch_rows(port, "net")
            wpids = pool_worker_pids(pool)
            ticks = [cpu_ticks(pid) for pid in wpids[:1]]  # the one worker
            rows[graphs] = b.measure("batching", name, pool.frontend, clients, load,
                                     broker=[pool.proc.pid], workers=wpids)
            after = batch_rows(port, "net")
            split = us_per_request(ticks[0], cpu_ticks(wpids[0]), rows[graphs]["requests"])
            rows[graphs]["worker_threads_us"] = {k: round(v, 1) for k, v in split.items()}
            print(f"  {name}: worker CPU per request: serving thread {split['main']:.1f} us, "
                  f"zmq I/O {split['zmq']:.1f} us, other threads {split['other']:.1f} us",
                  flush=True)
            forwards = after[1] - before[1]
            if forwards > 0:  # what the worker's heartbeats reported: rows per forward
                mean = (after[0] - before[0]) / forwards
                rows[graphs]["rows_per_forward"] = round(mean, 1)
                print(f"  {name}: {mean:.1f} rows per forward", flush=True)
            for line in pool.log_tail(20_000).splitlines()[-200:]:
                if " WARNING " in line or " ERROR " in line:
                    print(f"  poold: {line[:300]}", flush=True)
    row = rows[resnet]
    b.compare(Compare("batching", f"images/s, {clients} clients x batch 1", "pool",
                      row["rps"], "direct batch 64", direct[64]["images_per_s"], "images/s",
                      target=0.8 if resnet else None))
    b.compare(Compare("batching", f"images/s, {clients} clients x batch 1", "pool",
                      row["rps"], "direct batch 1", direct[1]["images_per_s"], "images/s",
                      note="what batching buys"))
    if resnet:
        b.compare(Compare("batching", f"images/s, {clients} clients x batch 1",
                          "pool, no graphs", rows[False]["rps"], "direct batch 64",
                          direct[64]["images_per_s"], "images/s",
                          note="cuda_graphs = false"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch_rows(port: int, model: str) -> tuple[float, float]:
    """(sum, count) of the pool's gpupool_batch_size histogram for ``model``."""
    import urllib.request

    found = {"sum": 0.0, "count": 0.0}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            for part in found:
                if line.startswith(f'gpupool_batch_size_{part}{{model="{model}"}}'):
                    found[part] = float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"]
