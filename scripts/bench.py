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
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_batching import section_batching  # noqa: E402
from bench_harness import Bench, gpu_device, mlp_files, preread  # noqa: E402
from bench_oip import section_oip  # noqa: E402
from bench_router import section_big, section_router  # noqa: E402
from bench_spawn import section_spawn  # noqa: E402
from bench_standby import section_standby  # noqa: E402
from bench_weights import section_weights  # noqa: E402
from benchkit import (  # noqa: E402
    BenchError,
    machine_info,
    num,
    print_compare,
    print_machine,
    print_table,
)

# gpu_device, mlp_files and preread: other sections' modules used to import them from here.
__all__ = ["RUNNERS", "SECTIONS", "Bench", "gpu_device", "main", "mlp_files", "preread"]

SECTIONS = ("router", "big", "spawn", "batching", "weights", "standby", "oip")


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "router": section_router, "big": section_big, "spawn": section_spawn,
    "batching": section_batching, "weights": section_weights, "standby": section_standby,
    "oip": section_oip,
}


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
    ap.add_argument("--oip-spin-us", type=int, default=-1,
                    help="the gateways' oip_spin_us (oip; default -1 = the pool's default)")
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
