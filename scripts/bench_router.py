"""The router and big-tensor sections: the pool against a direct REQ->REP pair and a C
zmq.proxy (1 KiB requests), and against a raw echo (64 MiB each way).
"""

from __future__ import annotations

import contextlib
import os
import statistics
from typing import Any

from bench_harness import Bench, default_workers, pool_worker_pids
from benchkit import (
    Compare,
    Load,
)


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
