"""One worker, driven directly over its DEALER protocol: host CPU per request.

Starts ``workers.main.run`` in a child process (what the spawner's fork runs), binds
the ROUTER the worker connects to (the router's side of ``router.protocol``'s internal
framing) and keeps ``--inflight`` requests outstanding: closed loop, each reply sends
the next request. After ``--warmup-s`` it measures for ``--seconds`` and reports
requests/s, rows per forward (from the worker's heartbeats), the worker's CPU per
request (all threads; the serving thread; libzmq's I/O thread) and this driver's own,
so that a saturated driver shows. No router is involved: the figure is the worker's
ceiling, receive to reply. ``--reference`` then times the same model called in-process
at batch ``--max-batch`` (as ``scripts/bench.py --batching`` does) and prints the ratio.

CPU (a tiny scripted model, [N,3,224,224] fp16 -> [N,1000] fp16; ~25 s)::

    PYTHONPATH=. python scripts/bench_worker_host.py

GPU, scripted resnet50 fp16 (built here with torchvision, random weights; or --model)::

    PYTHONPATH=. python scripts/bench_worker_host.py --device cuda:0 --resnet --reference
    PYTHONPATH=. python scripts/bench_worker_host.py --device cuda:0 --model net.pt --reference

``--via-spawner`` forks the worker from ``workers.spawner`` as poold does, instead of
starting a fresh interpreter. ``--cuda-graphs`` replays the forward as CUDA graphs
(``cuda_graphs = true``). ``--profile FILE`` runs the worker under cProfile (the
serving thread's CPU time) and prints its top functions. ``GPU_POOL_STAGE_ON_ARRIVAL=1``
in the environment makes a CPU worker stage requests as a GPU worker does (see
``workers/serve.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_worker_cpu import cpu_ticks, us_per_request  # noqa: E402
from bench_worker_drive import WID, drive  # noqa: E402
from bench_worker_reference import reference, reference_main  # noqa: E402
from bench_worker_target import SpawnedWorker, resnet_model, tiny_model, worker_main  # noqa: E402

# cpu_ticks and us_per_request: what scripts/bench.py used to import from here.
__all__ = ["cpu_ticks", "main", "us_per_request"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="", help="model file (default: a tiny scripted model)")
    ap.add_argument("--resnet", action="store_true", help="build scripted resnet50 fp16")
    ap.add_argument("--inflight", type=int, default=64, help="requests kept outstanding")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-delay-ms", type=float, default=2.0, help="pool default: 2.0")
    ap.add_argument("--shape", default="1,3,224,224", help="one request's input shape")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay the forward as CUDA graphs")
    ap.add_argument(
        "--via-spawner",
        action="store_true",
        help="fork the worker from workers.spawner, as poold does (default: a fresh process)",
    )
    ap.add_argument("--threads", type=int, default=0, help="worker torch threads (0: its own)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time")
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--profile", default="", help="cProfile the worker into this file")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="then time the same model in-process at batch --max-batch (rows/s), for the ratio",
    )
    ap.add_argument("--reference-s", type=float, default=3.0)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--reference-role", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a.worker, a.profile)
    if a.reference_role:
        return reference_main(a.reference_role)

    shape = [int(s) for s in a.shape.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench-worker-")
    t_build = time.monotonic()
    if a.resnet:
        path = resnet_model(tmp.name)
    elif a.model:
        path = a.model
    else:
        path = tiny_model(tmp.name, shape, a.dtype, a.max_batch)
    build_s = time.monotonic() - t_build

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    backend = f"ipc://{tmp.name}/backend.sock"
    sock.bind(backend)
    spec = {
        "wid": WID.decode(),
        "backend": backend,
        "model": "net",
        "path": path,
        "version": "1",
        "device": a.device,
        "generation": 1,
        "max_batch": a.max_batch,
        "max_delay_ms": a.max_delay_ms,
        "heartbeat_interval_s": 0.5,
        "threads": a.threads or None,
        "cuda_graphs": a.cuda_graphs,
    }
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    if a.profile:
        cmd += ["--profile", os.path.abspath(a.profile)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc: Any = SpawnedWorker(spec, env) if a.via_spawner else subprocess.Popen(cmd, env=env)
    try:
        result = drive(a, sock, proc, shape, build_s)
        result["via_spawner"] = a.via_spawner
        result["worker_pid"] = proc.pid
        if isinstance(proc, SpawnedWorker):
            result["spawner_pid"] = proc.spawner.pid
        rows = result["requests_per_s"] * math.prod(shape[:1])
        result["rows_per_s"] = round(rows, 1)
        if a.reference:
            result["reference"] = reference(a, path, shape, env)
        report(a, result)
        if a.json:
            print(json.dumps(result), flush=True)
        if a.profile:
            import pstats

            print("worker profile (serving thread CPU time):")
            pstats.Stats(a.profile).sort_stats("tottime").print_stats(25)
        return 1 if result["errors"] else 0
    finally:
        if proc.poll() is None or isinstance(proc, SpawnedWorker):
            proc.kill()
            proc.wait()
        sock.close()
        ctx.term()
        tmp.cleanup()


def report(a: argparse.Namespace, r: dict[str, Any]) -> None:
    print(
        f"{r['model']} on {a.device}, {a.inflight} in flight, {r['request_bytes']} B requests, "
        f"max_batch {a.max_batch}, max_delay_ms {a.max_delay_ms:g}"
        f"{', CUDA graphs' if a.cuda_graphs else ''}\n"
        f"  {r['requests']} requests in {r['seconds']:.2f} s: {r['requests_per_s']:,.0f} req/s, "
        f"{r['rows_per_forward']} rows per forward, {r['errors']} errors\n"
        f"  worker CPU per request: {r['worker_cpu_us_per_request']:.1f} us (serving thread "
        f"{r['worker_main_thread_us']:.1f}, zmq I/O {r['worker_zmq_io_us']:.1f}, other "
        f"threads {r['worker_other_threads_us']:.1f}); serving thread "
        f"{r['worker_main_thread_busy']:.0%} busy\n"
        f"  driver CPU per request: main thread {r['driver_main_thread_us']:.1f} us "
        f"({r['driver_main_thread_busy']:.0%} busy), zmq I/O {r['driver_zmq_io_us']:.1f} us "
        f"(worker ready after {r['ready_s']:.1f} s)",
        flush=True,
    )
    if r["driver_main_thread_busy"] > 0.85:
        print("  NOTE: the driver's thread is nearly saturated: it may be what limits req/s")
    if r["first_error"]:
        print(f"  first error: {r['first_error']}", flush=True)
    ref = r.get("reference")
    if ref:
        print(
            f"  in-process reference, batch {a.max_batch}: {ref['images_per_s']:,.0f} rows/s "
            f"({ref['ms_per_batch']:.2f} ms a forward); this worker: "
            f"{r['rows_per_s'] / ref['images_per_s']:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
