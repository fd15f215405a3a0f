#!/usr/bin/env python3
"""Two gateway code trees against one pool, interleaved: which one is faster, and by how much.

usage: bench_oip_ab.py [--tree NAME=DIR ...] [--variant NAME=ARGS ...] [--rounds N]
                       [--requests N] [--big | --live] [--protocol http|grpc|both]
                       [--clients N]

A busy or shared machine moves a single latency figure by more than most changes to the
gateway do. So this starts one pool (1 CPU worker, no gateways of its own), then an HTTP
and a gRPC gateway (``python -m gateway``) per code tree, all on that pool, and takes
turns: each round sends ``--requests`` requests from one client to each gateway in turn
(every other round in reverse order). Noise then falls on every tree alike. Printed per
tree and protocol: the median over rounds of the round's p50, and the gateway's CPU time
per request (psutil). ``--tree same=.`` (this checkout again) shows what the noise alone
does to the figures.

``--tree before=/tmp/before`` adds a tree, e.g. ``git archive REV gateway router pool |
tar -x -C /tmp/before``; this checkout is always the tree ``this``. ``--variant
spin=--spin-us=200`` adds this checkout's gateway again with more arguments (split on
spaces), for a setting rather than a tree. ``--big`` sends a
[1, 3, 224, 224] float16 tensor (resnet50's input, 294 KiB) to a model that answers
its first 1,000 values (resnet50's output size), instead of 1 KiB float32 [1, 256]
to the identity: the per-request cost of large inputs. ``--live`` sends the health call
instead (GET /v2/health/live, gRPC ServerLive): the server alone, no router.
``--clients N`` sends from N threads at once, each with its own connection (as N
tritonclient clients would), and also prints the round's requests/s;
``--protocol grpc`` leaves the HTTP gateways out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from benchkit import Procs, start_pool, stop_pool  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_head(path: str) -> str:
    """TorchScript ``forward(x) -> x.flatten(1)[:, :1000]``: resnet50's answer size."""
    import torch

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :1000].contiguous()

    torch.jit.script(Head()).save(path)
    return path


def start_gateway(
    tree: str, protocol: str, listen: str, pool: Any, log: str, extra: list[str]
) -> subprocess.Popen[bytes]:
    # the tree first; what PYTHONPATH already held (a --target site of wheels) after it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (tree, os.environ.get("PYTHONPATH", "")) if p))  # fmt: skip
    argv = [sys.executable, "-m", "gateway", "--protocol", protocol, "--listen", listen,
            "--frontend", pool.frontend, "--control", pool.control,
            "--log-level", "WARNING", *extra]  # fmt: skip
    with open(log, "ab") as err:
        return subprocess.Popen(argv, env=env, cwd=tree, stdout=err, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def http_call(address: str, model: str, data: np.ndarray, live: bool) -> Callable[[], None]:
    raw = data.tobytes()
    datatype = {"float32": "FP32", "float16": "FP16"}[str(data.dtype)]
    head = json.dumps({"inputs": [{"name": "input0", "shape": list(data.shape),
                                   "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    body = head + raw
    headers = {"Inference-Header-Content-Length": str(len(head)),
               "Content-Type": "application/octet-stream"}  # fmt: skip
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))

    def call() -> None:
        for again in (True, False):
            try:
                if live:
                    conn.request("GET", "/v2/health/live")
                else:
                    conn.request("POST", f"/v2/models/{model}/infer", body, headers)
                r = conn.getresponse()
                r.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()  # uvicorn closes a connection idle for 5 s: connect again
                if not again:
                    raise
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")

    return call


def grpc_call(address: str, model: str, data: np.ndarray, live: bool) -> Callable[[], None]:
    import grpc

    from gateway.proto import grpc_predict_v2_pb2 as pb
    from gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    # a subchannel of its own: each client its own connection, as separate processes get
    opts = [("grpc.max_receive_message_length", 1 << 30), ("grpc.use_local_subchannel_pool", 1)]
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address, options=opts))
    datatype = {"float32": "FP32", "float16": "FP16"}[str(data.dtype)]
    req = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input0", datatype=datatype,
                                                      shape=list(data.shape))],
        raw_input_contents=[data.tobytes()],
    )  # fmt: skip
    if live:
        return lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=60)
    return lambda: stub.ModelInfer(req, timeout=60)


def wait_ready(call: Callable[[], None], gw: subprocess.Popen[bytes], name: str) -> None:
    end = time.monotonic() + 60
    while True:
        try:
            call()
            return
        except Exception as exc:  # not listening, or no catalog yet
            if gw.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"gateway {name} did not come up: {exc}") from None
            time.sleep(0.2)


def timed_round(calls: list[Callable[[], None]], requests: int) -> tuple[list[float], float]:
    """Every call ``requests`` times, each from a thread of its own, released together:
    (latencies, wall seconds)."""
    lats: list[list[float]] = [[] for _ in calls]
    alone = len(calls) == 1  # one client: in this thread, no barrier to wait at
    go = threading.Barrier(1 if alone else len(calls) + 1)

    def client(call: Callable[[], None], lat: list[float]) -> None:
        go.wait()
        for _ in range(requests):
            s = time.perf_counter()
            call()
            lat.append(time.perf_counter() - s)

    if alone:
        t0 = time.perf_counter()
        client(calls[0], lats[0])
        return lats[0], time.perf_counter() - t0
    pairs = zip(calls, lats, strict=True)
    threads = [threading.Thread(target=client, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return [x for lat in lats for x in lat], time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="this tree's gateway with more arguments, e.g. spin=--spin-us=200")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300, help="per client per gateway per round")
    ap.add_argument("--big", action="store_true", help="294 KiB float16 inputs")
    ap.add_argument("--live", action="store_true", help="the health call, not infer")
    ap.add_argument("--protocol", choices=("http", "grpc", "both"), default="both")
    ap.add_argument("--clients", type=int, default=1, help="concurrent clients per gateway")
    ap.add_argument("--dir", default="/tmp/oip-ab", help="scratch directory")
    args = ap.parse_args()
    # A SIGTERM (timeout(1), a CI limit) must still reach the finally below, or the pool
    # and the gateways, each in a session of its own, outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    trees: dict[str, tuple[str, list[str]]] = {"this": (ROOT, [])}
    for item in args.tree:
        name, _, path = item.partition("=")
        trees[name] = (os.path.abspath(path), [])
    for item in args.variant:
        name, _, extra = item.partition("=")
        trees[name] = (ROOT, extra.split())
    makers = [(p, m) for p, m in (("http", http_call), ("grpc", grpc_call))
              if args.protocol in (p, "both")]  # fmt: skip
    os.makedirs(args.dir, exist_ok=True)
    procs = Procs(args.dir)
    if args.big:
        model_path = make_head(os.path.join(args.dir, "head.pt"))
        data = np.ones((1, 3, 224, 224), np.float16)
    else:
        from benchmodels import make_identity

        model_path = make_identity(os.path.join(args.dir, "id.pt"))
        data = np.ones((1, 256), np.float32)
    cfg = {"name": "m", "path": model_path, "devices": ["cpu"], "threads": 1,
           "max_batch": 32, "max_delay_ms": 0.0}  # fmt: skip
    pool = start_pool(procs, args.dir, [cfg])
    gateways: list[subprocess.Popen[bytes]] = []
    try:
        targets: list[tuple[str, list[Callable[[], None]], psutil.Process]] = []
        for name, (tree, extra) in trees.items():
            for protocol, make in makers:
                address = f"127.0.0.1:{free_port()}"
                log = os.path.join(args.dir, f"gateway-{name}-{protocol}.log")
                gw = start_gateway(tree, protocol, address, pool, log, extra)
                gateways.append(gw)
                calls = [make(address, "m", data, args.live) for _ in range(args.clients)]
                wait_ready(calls[0], gw, f"{name}/{protocol}")
                targets.append((f"{name}/{protocol}", calls, psutil.Process(gw.pid)))
        for _, calls, _ in targets:
            timed_round(calls, max(1, 100 // len(calls)))
        p50s: dict[str, list[float]] = {t[0]: [] for t in targets}
        cpus: dict[str, list[float]] = {t[0]: [] for t in targets}
        rates: dict[str, list[float]] = {t[0]: [] for t in targets}
        load0 = os.getloadavg()[0]
        for i in range(args.rounds):
            # Every other round in reverse order: no tree always runs right after another.
            for label, calls, proc in targets if i % 2 == 0 else targets[::-1]:
                c0 = sum(proc.cpu_times()[:2])
                lat, wall = timed_round(calls, args.requests)
                cpus[label].append((sum(proc.cpu_times()[:2]) - c0) / len(lat))
                p50s[label].append(statistics.median(lat))
                rates[label].append(len(lat) / wall)
        what = "294 KiB float16 -> 1,000 values" if args.big else "1 KiB float32 identity"
        if args.live:
            what = "health live (no router)"
        load1 = os.getloadavg()[0]
        print(f"oip a/b: {what}, {args.clients} client(s), {args.rounds} rounds x "
              f"{args.requests} requests, {psutil.cpu_count()} cores, "
              f"load {load0:.1f} -> {load1:.1f}")  # fmt: skip
        for label in p50s:
            lo, hi = min(p50s[label]), max(p50s[label])
            print(f"  {label:<14} p50 {statistics.median(p50s[label]) * 1e6:7.0f} us "
                  f"(rounds {lo * 1e6:.0f}-{hi * 1e6:.0f})  gateway cpu/req "
                  f"{statistics.median(cpus[label]) * 1e6:6.0f} us  "
                  f"{statistics.median(rates[label]):7.0f} req/s", flush=True)  # fmt: skip
    finally:
        for gw in gateways:
            try:
                os.killpg(gw.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            gw.wait()
        stop_pool(procs, pool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
