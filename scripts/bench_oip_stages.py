#!/usr/bin/env python3
"""Where one OIP request's time goes: 1-client p50 of each stage, and the gateway's CPU.

usage: bench_oip_stages.py [--requests N] [--oip-processes N] [--spin-us N[,N...]]

One pool (1 CPU worker, identity TorchScript, 1 KiB float32 [1, 256]) with both gateways;
one client at a time, closed loop, in this process:

  zmq          the ZeroMQ path (router.client): the reference the gateway adds to
  upstream     libzmq's DEALER as the gateway uses it under CURVE (gateway.upstream),
               from an asyncio loop here: that ZeroMQ hop with no HTTP or gRPC
  zmtp         the same hop over the gateway's own ZMTP link (gateway.zmtp), its default
  http-live    GET /v2/health/live: the HTTP hop and server alone, no router
  http         POST .../infer, binary tensors: the whole OIP/HTTP path
  grpc-live    ServerLive: the gRPC hop and server alone
  grpc         ModelInfer with raw_input_contents: the whole OIP/gRPC path

``--spin-us 0,200,0,200`` runs the whole list once per value, one fresh pool each, with
the gateways' ``oip_spin_us`` set so (gateway/spin_loop.py): interleaved A/B rounds.

Besides each p50 it prints the CPU time per request of the gateway processes of that
protocol and of poold (psutil), which a busy machine disturbs less than latency. The
figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from benchkit import Procs, start_pool, stop_pool  # noqa: E402


def cpu_s(procs: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def stage(name: str, fn: Callable[[], Any], n: int, gw: list[psutil.Process],
          poold: psutil.Process) -> None:
    for _ in range(min(200, n)):
        fn()
    g0, r0, lat = cpu_s(gw), cpu_s([poold]), []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - s)
    g1, r1 = cpu_s(gw), cpu_s([poold])
    gw_text = f"gateway cpu/req {(g1 - g0) / n * 1e6:6.0f} us" if gw else " " * 26
    print(f"  {name:<10} p50 {statistics.median(lat) * 1e6:7.0f} us  "
          f"p90 {np.percentile(lat, 90) * 1e6:7.0f} us  {gw_text}  "
          f"poold cpu/req {(r1 - r0) / n * 1e6:5.0f} us", flush=True)  # fmt: skip


def upstream_stage(frontend: str, n: int, poold: psutil.Process, kind: str = "upstream") -> None:
    from gateway.tensors import WireTensor
    from gateway.upstream import Upstream
    from gateway.zmtp import ZmtpUpstream

    data = np.ones((1, 256), np.float32).tobytes()

    async def run() -> None:
        up = Upstream(frontend) if kind == "upstream" else ZmtpUpstream(frontend)
        up.start()
        t = [WireTensor("float32", (1, 256), data)]
        loop = asyncio.get_running_loop()
        for _ in range(200):
            await up.infer("id", t)
        r0, lat = cpu_s([poold]), []
        c0 = time.process_time()
        for _ in range(n):
            s = time.perf_counter()
            await up.infer("id", t)
            lat.append(time.perf_counter() - s)
        own = (time.process_time() - c0) / n * 1e6
        print(f"  {kind:<10} p50 {statistics.median(lat) * 1e6:7.0f} us  "
              f"p90 {np.percentile(lat, 90) * 1e6:7.0f} us  own cpu/req {own:10.0f} us  "
              f"poold cpu/req {(cpu_s([poold]) - r0) / n * 1e6:5.0f} us", flush=True)  # fmt: skip
        up.close()
        del loop

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per stage")
    ap.add_argument("--oip-processes", type=int, default=1, help="gateways per protocol")
    ap.add_argument("--dir", default="/tmp/oip-stages", help="scratch directory")
    ap.add_argument("--spin-us", default="0", metavar="N[,N...]",
                    help="the gateways' oip_spin_us; a list runs one pool per value")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the pool below
    for spin in [int(v) for v in args.spin_us.split(",")]:
        run_pool(args, spin)
    return 0


def run_pool(args: argparse.Namespace, spin_us: int) -> None:
    import grpc
    from benchmodels import make_identity

    from gateway.proto import grpc_predict_v2_pb2 as pb
    from gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc
    from router.client import Client

    os.makedirs(args.dir, exist_ok=True)
    procs = Procs(args.dir)
    model = make_identity(os.path.join(args.dir, "id.pt"))
    cfg = {"name": "id", "path": model, "devices": ["cpu"], "threads": 1, "max_batch": 32,
           "max_delay_ms": 0.0}  # fmt: skip
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    http_at, grpc_at = (f"127.0.0.1:{p}" for p in ports)
    pool = start_pool(procs, args.dir, [cfg], http=http_at, grpc=grpc_at,
                      oip_processes=args.oip_processes, oip_spin_us=spin_us)  # fmt: skip
    try:
        poold = psutil.Process(pool.proc.pid)
        end = time.monotonic() + 60
        while True:
            kids = [c for c in poold.children() if "gateway" in " ".join(c.cmdline())]
            if len(kids) == 2 * args.oip_processes or time.monotonic() > end:
                break
            time.sleep(0.1)
        by = {p: [k for k in kids if p in k.cmdline()] for p in ("http", "grpc")}
        print(f"oip stages: 1 client, {args.requests} requests per stage, "
              f"{args.oip_processes} gateway process(es) per protocol, oip_spin_us {spin_us}, "
              f"{psutil.cpu_count()} cores", flush=True)  # fmt: skip
        data = np.ones((1, 256), np.float32)
        n = args.requests
        client = Client(pool.frontend)
        stage("zmq", lambda: client.infer("id", data), n, [], poold)
        upstream_stage(pool.frontend, n, poold)
        upstream_stage(pool.frontend, n, poold, "zmtp")
        head = json.dumps({"inputs": [{"name": "input0", "shape": [1, 256], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 1024}}],
                           "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
        body = head + data.tobytes()
        headers = {"Inference-Header-Content-Length": str(len(head)),
                   "Content-Type": "application/octet-stream"}  # fmt: skip
        host, port = http_at.rsplit(":", 1)
        end = time.monotonic() + 60
        while True:  # the gateways answer once they have read the catalog
            try:
                conn = http.client.HTTPConnection(host, int(port))
                conn.request("GET", "/v2/health/ready")
                ready = conn.getresponse()
                ready.read()
                if ready.status == 200 or time.monotonic() > end:
                    break
            except OSError:
                pass
            time.sleep(0.1)

        def live() -> None:
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()

        def infer() -> None:
            conn.request("POST", "/v2/models/id/infer", body, headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")

        stage("http-live", live, n, by["http"], poold)
        stage("http", infer, n, by["http"], poold)
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_at))
        req = pb.ModelInferRequest(
            model_name="id",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input0", datatype="FP32",
                                                          shape=[1, 256])],
            raw_input_contents=[data.tobytes()],
        )  # fmt: skip
        stage("grpc-live", lambda: stub.ServerLive(pb.ServerLiveRequest()), n, by["grpc"], poold)
        stage("grpc", lambda: stub.ModelInfer(req), n, by["grpc"], poold)
    finally:
        stop_pool(procs, pool)


if __name__ == "__main__":
    sys.exit(main())
