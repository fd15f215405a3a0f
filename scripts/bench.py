#!/usr/bin/env python3
"""gpu-pool benchmarks: every figure next to its reference, measured in the same run.

Sections (issue 2 item 8, issue 5):

  --router    1 KiB requests, 1/8/32 clients: the pool against a direct REQ->REP pair and a
              C zmq.proxy ROUTER->DEALER in front of N REP workers doing the pool worker's
              own per-request work (decode, TorchScript forward, encode)
  --big       64 MiB request and reply through the pool against a raw REQ->REP echo
  --spawn     (CUDA) worker spawn -> ready in upgrades against the floor measured inside
              the worker (CUDA init + load + warm-up) and a cold ``python -c`` process
  --batching  (CUDA + torchvision) resnet50 fp16, 64 clients sending batch-1 requests,
              against the same scripted model called in-process at batch 64
  --weights   the 768 MiB MLP: torch.jit.load against the safetensors factory format
  --standby   (CUDA) hot standby on and off: spawn->ready, drain-first worst latency under
              8 clients, kill -9 -> first answer, safetensors load / pinned H2D copy
              (scripts/bench_standby.py)
  --oip       the Open Inference Protocol gateway: HTTP and gRPC against a uvicorn +
              starlette app with the model in-process, and against the ZeroMQ path
              (scripts/bench_oip.py); resnet50 fp16 over gRPC with CUDA
  --all       every section this machine supports (GPU sections say why they skip)

Clients are separate processes doing closed-loop REQ round trips in the gpu-pool/1
framing with raw pyzmq (prebuilt frames, so that client-side encoding costs the same
for every target). They are released together and run for ``--seconds`` each (or
``--requests M`` each); req/s is all requests over the span from the first start to the
last finish. Each client row also gives the CPU time per request of the broker process
(poold or the C proxy) and of the workers: on a busy or small machine that figure moves
less than latency does. GPU sections run their CUDA work in child processes; this one
never initialises CUDA. Examples::

  python scripts/bench.py --router --big --quick
  python scripts/bench.py --all --json bench.json
  python scripts/bench.py --spawn --batching --quick --cpu-dry-run   # code path, no GPU
  python scripts/bench.py --standby --quick --cpu-dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_oip import section_oip  # noqa: E402
from bench_standby import section_standby  # noqa: E402
from bench_worker_host import cpu_ticks, us_per_request  # noqa: E402
from benchkit import (  # noqa: E402
    BenchError,
    Compare,
    Load,
    Pool,
    Procs,
    cpu_seconds,
    machine_info,
    mem_available,
    num,
    print_compare,
    print_machine,
    print_table,
    readline,
    run_clients,
    start_pool,
    stop_pool,
    wait_ready,
)
from benchroles import COLD_CODE  # noqa: E402

SECTIONS = ("router", "big", "spawn", "batching", "weights", "standby", "oip")
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


# ------------------------------------------------------------------- sections
def default_workers(b: Bench) -> int:
    fit = max(1, min(8, (mem_available() - (1 << 30)) // WORKER_MEM))
    if fit < 8:
        b.note(f"only {fit} CPU workers fit in memory (8 wanted); use --workers N to force")
    return int(fit)


def section_router(b: Bench) -> None:
    """Every target is started first, then measured in ``--rounds`` interleaved rounds
    (direct, proxy, pool, variants; again); a compared figure is the median over rounds.
    On a shared virtual machine the same row moves by tens of percent from one minute to
    the next, and whatever runs first after a start-up runs slow: interleaving gives
    every target the same share of both."""
    from benchmodels import make_identity

    a = b.args
    d = b.dir("router")
    workers = a.workers or default_workers(b)
    clients = a.clients
    rounds = a.rounds or (1 if b.quick else 3)
    model = make_identity(os.path.join(d, "id.pt"))
    load = Load("float32", [1, 256], model="id", seconds=b.seconds, requests=a.requests,
                warm=20, check_identity=True)
    per = f"{a.requests} requests" if a.requests else f"{b.seconds:.1f} s"
    print(f"\n== router: 1 KiB requests (float32 [1, 256], identity TorchScript), {workers} "
          f"workers, max_batch {a.max_batch}, max_delay_ms {a.max_delay_ms:g}, {per} per client, "
          f"{rounds} interleaved round{'s' * (rounds > 1)} (figures: medians)", flush=True)
    # (key, row name, endpoint, client counts, broker pids, worker pids)
    targets: list[tuple[str, str, str, list[int], list[int] | None, list[int]]] = []
    cfg = {"name": "id", "path": model, "devices": ["cpu"] * workers, "threads": 1,
           "max_batch": a.max_batch, "max_delay_ms": a.max_delay_ms}
    with contextlib.ExitStack() as stack:
        for work in ("echo", "model"):
            ep = f"ipc://{d}/direct-{work}.sock"
            reps = stack.enter_context(b.rep(ep, work, 1, bind=True, model_path=model))
            targets.append((f"direct-{work}", f"direct REQ->REP ({work})", ep, [1], None, reps))
        front, back = f"ipc://{d}/px-front.sock", f"ipc://{d}/px-back.sock"
        px = stack.enter_context(b.proxy(front, back))
        reps = stack.enter_context(b.rep(back, "model", workers, model_path=model))
        targets.append(("proxy", f"zmq.proxy + {workers} REP (model)", front, clients, px, reps))
        if not b.quick:
            front, back = f"ipc://{d}/pe-front.sock", f"ipc://{d}/pe-back.sock"
            px = stack.enter_context(b.proxy(front, back))
            reps = stack.enter_context(b.rep(back, "echo", workers))
            targets.append(("proxy-echo", f"zmq.proxy + {workers} REP (echo)", front,
                            clients[-1:], px, reps))
        pool = stack.enter_context(b.pool("router-pool", [cfg]))
        targets.append(("pool", f"pool ({workers} workers)", pool.frontend, clients,
                        [pool.proc.pid], pool_worker_pids(pool)))
        for variant in filter(None, a.router_variants.split(";")):
            opts = {k: option_value(v) for k, v in (kv.split("=", 1) for kv in variant.split(","))}
            name = "router-pool-" + variant.replace(",", "-").replace("=", "")
            vpool = stack.enter_context(b.pool(name, [cfg], **opts))
            targets.append((f"variant {variant}", f"pool {variant}", vpool.frontend, clients,
                            [vpool.proc.pid], pool_worker_pids(vpool)))
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in range(rounds):
            for key, name, ep, counts, broker, pids in targets:
                for c in counts:
                    runs.setdefault((key, c), []).append(b.measure(
                        "router", name, ep, c, load, broker=broker, workers=pids,
                        n_workers=1 if key.startswith("direct") else workers, round=r + 1))

    def med(key: str, c: int, field: str) -> float:
        return float(statistics.median(row[field] for row in runs[(key, c)]))

    for c in clients:
        b.compare(Compare("router", f"req/s, {c} client{'s' * (c > 1)}", "pool",
                          med("pool", c, "rps"), "zmq.proxy", med("proxy", c, "rps"),
                          "req/s", target=1.0 if c == 32 else None))
    if ("proxy-echo", clients[-1]) in runs:
        c = clients[-1]
        b.compare(Compare("router", f"req/s, {c} clients", "pool", med("pool", c, "rps"),
                          "zmq.proxy+echo", med("proxy-echo", c, "rps"), "req/s",
                          note="echo workers, as the baseline's 49.2k"))
    if 1 in clients:
        direct = med("direct-model", 1, "p50_us")
        b.compare(Compare("router", "p50, 1 client", "pool", med("pool", 1, "p50_us"),
                          "direct (model)", direct, "us", kind="diff", target=100.0))
        b.compare(Compare("router", "p50, 1 client", "zmq.proxy", med("proxy", 1, "p50_us"),
                          "direct (model)", direct, "us", kind="diff",
                          note=f"what one C hop costs ({workers} REP workers in turn)"))


def option_value(text: str) -> Any:
    """A pool option's value as written in --router-variants: an int, true/false, or text."""
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text, text)


def pool_worker_pids(pool: Pool) -> list[int]:
    return [w["pid"] for m in pool.ctl("status")["data"]["models"] for w in m["workers"]
            if w.get("pid")]


def section_big(b: Bench) -> None:
    from benchmodels import make_identity

    d = b.dir("big")
    model = make_identity(os.path.join(d, "id.pt"))
    n = b.args.big_mib << 18  # float32 elements
    load = Load("float32", [n], model="id", seconds=b.seconds, requests=b.args.requests,
                warm=2, min_requests=3, check_identity=True)
    size = n * 4
    print(f"\n== big: {size >> 20} MiB request and {size >> 20} MiB reply (float32 [{n}], "
          "identity), 1 client", flush=True)
    ep = f"ipc://{d}/raw.sock"
    with b.rep(ep, "echo", 1, bind=True, copy=False) as reps:
        raw = b.measure("big", "raw REQ->REP echo", ep, 1, load, workers=reps)
    cfg = {"name": "id", "path": model, "devices": ["cpu"], "threads": 1, "max_batch": 1,
           "max_delay_ms": 0.0}
    with b.pool("big-pool", [cfg]) as pool:
        pooled = b.measure("big", "pool (1 worker)", pool.frontend, 1, load,
                           broker=[pool.proc.pid], workers=pool_worker_pids(pool))
    for row in (raw, pooled):
        row["mb_per_s"] = 2 * size * row["rps"] / 1e6
    b.compare(Compare("big", f"{size >> 20} MiB each way", "pool", pooled["mb_per_s"],
                      "raw REQ->REP", raw["mb_per_s"], "MB/s", target=0.5,
                      note="MB/s counts request + reply bytes"))


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


def section_weights(b: Bench) -> None:
    from benchmodels import make_factory_copy

    devices = (["cuda:0"] if b.info["cuda"] else []) + ["cpu"]
    print(f"\n== weights: torch.jit.load vs safetensors factory format, on "
          f"{', '.join(devices)}, from page cache", flush=True)
    paths, hidden, layers = mlp_files(b, 1, small=False)
    st = make_factory_copy(paths[0], b.dir(f"factory-{hidden}x{layers}"), hidden, layers)
    # (the load_weights role reads both files into the page cache itself)
    for dev in devices:
        p = b.procs.role("load_weights", {"pt": paths[0], "st": st, "device": dev,
                                          "repeats": b.args.weight_repeats})
        try:
            res = json.loads(readline(p, 600, f"weights load on {dev}"))
        finally:
            b.procs.kill(p)
        nbytes = res["param_bytes"]
        rate = {}
        for fmt, times in res["times"].items():
            t = statistics.median(times)
            rate[fmt] = nbytes / t / 1e9
            b.rows.append({"section": "weights", "name": f"{fmt} -> {dev}", "bytes": nbytes,
                           "times_s": times, "median_s": t, "gb_per_s": rate[fmt]})
            print(f"  {fmt:<12} -> {dev:<6} {nbytes / 2**20:.0f} MiB: median {t:.3f}s "
                  f"= {rate[fmt]:.2f} GB/s (runs: {', '.join(f'{x:.3f}' for x in times)})",
                  flush=True)
        cpu = dev == "cpu"
        b.compare(Compare("weights", f"load {nbytes / 2**20:.0f} MiB -> {dev}", "safetensors",
                          rate["safetensors"], "torch.jit.load", rate["torchscript"], "GB/s",
                          target=None if cpu else 5.0,
                          note="CPU: safetensors maps the file, no copy" if cpu else ""))


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "router": section_router, "big": section_big, "spawn": section_spawn,
    "batching": section_batching, "weights": section_weights, "standby": section_standby,
    "oip": section_oip,
}


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for s in SECTIONS:
        ap.add_argument(f"--{s}", action="store_true", help=f"run the {s} section")
    ap.add_argument("--all", action="store_true", help="every section this machine supports")
    ap.add_argument("--quick", action="store_true", help="CI-sized: short rows, small models")
    ap.add_argument("--json", metavar="FILE", help="save machine info, raw rows, comparisons")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="timed seconds per row (default 3, --quick 0.5)")
    ap.add_argument("--requests", type=int, default=0,
                    help="exactly M requests per client instead of --seconds")
    ap.add_argument("--clients", default="1,8,32", help="client counts (router)")
    ap.add_argument("--workers", type=int, default=0,
                    help="CPU workers for router (default 8 when they fit in memory)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="interleaved rounds per row (router; default 3, --quick 1)")
    ap.add_argument("--max-batch", type=int, default=1, help="pool max_batch (router)")
    ap.add_argument("--max-delay-ms", type=float, default=0.0, help="pool max_delay_ms (router)")
    ap.add_argument("--router-variants", default="",
                    help="extra pool rows (router) with other settings, e.g. "
                         "'router_lane=false;router_spin_us=200,io_threads=1' (info only: the "
                         "compared row always uses the defaults)")
    ap.add_argument("--big-mib", type=int, default=64, help="request size in MiB (big)")
    ap.add_argument("--oip-max-batch", type=int, default=32, help="pool max_batch (oip)")
    ap.add_argument("--oip-processes", type=int, default=0,
                    help="gateway processes per protocol (oip; default 0 = poold's auto)")
    ap.add_argument("--oip-max-delay-ms", type=float, default=0.0,
                    help="pool max_delay_ms (oip)")
    ap.add_argument("--batch-clients", type=int, default=64, help="clients (batching)")
    ap.add_argument("--batch-delay-ms", type=float, default=3.0, help="max_delay_ms (batching)")
    ap.add_argument("--upgrades", type=int, default=5, help="upgrades timed (spawn)")
    ap.add_argument("--cold-runs", type=int, default=3, help="cold processes timed (spawn)")
    ap.add_argument("--weight-repeats", type=int, default=3, help="loads per format (weights)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="without CUDA, run spawn/batching on the CPU with small models")
    ap.add_argument("--tmp", help="work directory (default: a new temp dir, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = ap.parse_args(argv)
    args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    if not args.clients or min(args.clients) < 1:
        ap.error("--clients needs positive integers")
    args.sections = [s for s in SECTIONS if args.all or getattr(args, s)]
    if not args.sections:
        ap.error("choose sections (--router --big --spawn --batching --weights --standby --oip) "
                 "or --all")
    if args.quick:
        args.upgrades = min(args.upgrades, 3)
        args.cold_runs = min(args.cold_runs, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    info = machine_info()
    print("gpu-pool bench: " + " ".join(sys.argv[1:]))
    print_machine(info)
    b = Bench(args, info)
    failed: list[str] = []
    try:
        for s in args.sections:
            done = len(b.comparisons)
            t, load0 = time.monotonic(), os.getloadavg()[0]
            try:
                RUNNERS[s](b)
            except Exception as exc:  # one section failing must not lose the others
                failed.append(s)
                if not isinstance(exc, BenchError):
                    traceback.print_exc()
                b.note(f"{s}: FAILED: {type(exc).__name__}: {exc}")
            finally:
                b.procs.kill_all()
            if len(b.comparisons) > done:
                print_compare(f"-- {s} ({time.monotonic() - t:.0f}s; load average "
                              f"{load0:.1f} -> {os.getloadavg()[0]:.1f} on {info['cpus']} cores)",
                              b.comparisons[done:])
        if len(args.sections) > 1 and b.comparisons:
            print(f"\n== summary ({info['date']}, {info['cpus']} cores, "
                  f"{', '.join(info['gpus']) or 'no GPU'}, torch {info['torch']})")
            print_compare("every figure next to its same-run reference", b.comparisons)
        detail(b)
        for text in b.notes:
            print(f"note: {text}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "argv": sys.argv[1:], "rows": b.rows,
                           "comparisons": [c.to_json() for c in b.comparisons],
                           "notes": b.notes, "failed": failed}, f, indent=1, default=str)
    finally:
        b.procs.kill_all()
        if args.keep or failed:
            print(f"work directory kept: {b.tmp}")
        elif not args.tmp:
            shutil.rmtree(b.tmp, ignore_errors=True)
    return 1 if failed else 0


def detail(b: Bench) -> None:
    rows = [r for r in b.rows if "rps" in r]
    if rows:
        def cpu(v: float | None) -> str:
            return "" if v is None else num(v)

        print_table("raw client rows (cpu us/req: CPU time of the broker process and of all "
                    "workers, per request)",
                    ["section", "target", "round", "clients", "req/s", "p50 us", "p99 us",
                     "requests", "errors", "broker cpu us/req", "workers cpu us/req"],
                    [[r["section"], r["name"], str(r.get("round", "")), str(r["clients"]),
                      num(r["rps"]),
                      num(r["p50_us"]), num(r["p99_us"]), str(r["requests"]), str(r["errors"]),
                      cpu(r.get("broker_cpu_us")), cpu(r.get("workers_cpu_us"))]
                     for r in rows])
    bad = [r for r in rows if r["errors"] or not math.isfinite(r["rps"])]
    for r in bad:
        b.note(f"{r['section']}/{r['name']}: {r['errors']} errors ({r['first_error']})")


if __name__ == "__main__":
    sys.exit(main())
