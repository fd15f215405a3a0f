"""The Open Inference Protocol section of scripts/bench.py (``--oip``), issue 20's table.

* req/s at 32 clients, 1 KiB float32 [1, 256] binary tensors over HTTP keep-alive and
  over gRPC, against the reference: a minimal uvicorn + starlette app calling the same
  TorchScript model in-process, one process (the way most teams serve a model);
* p50 at 1 client over HTTP and gRPC against the ZeroMQ path of the same pool;
* the HTTP servers the gateway could use (its own, uvicorn under a bare ASGI callable,
  starlette, aiohttp), each answering the same parsed OIP request
  with no model behind it (how the gateway's server was chosen);
* with CUDA and torchvision: resnet50 fp16, 64 gRPC clients against 64 ZeroMQ clients.

Clients are processes (``bench_oip_roles.py``), released together, closed-loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
from benchkit import BenchError, Compare, Load, cpu_seconds, num, readline, wait_ready

HERE = os.path.dirname(os.path.abspath(__file__))
ROLES = os.path.join(HERE, "bench_oip_roles.py")
ROOT = os.path.dirname(HERE)
SHAPE = [1, 256]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listening on port {port} after {timeout:.0f}s")


def _role(b: Any, role: str, cfg: dict[str, Any], name: str, stdin: bool = False) -> Any:
    return b.procs.start([sys.executable, ROLES, role, json.dumps(cfg)], name=name, stdin=stdin)


@contextlib.contextmanager
def _server(b: Any, role: str, cfg: dict[str, Any], name: str) -> Iterator[int]:
    port = _free_port()
    p = _role(b, role, {**cfg, "port": port}, name)
    try:
        wait_ready(p, 1, 120, name)
        _wait_port(port)
        yield port
    finally:
        b.procs.kill(p)


def run_oip_clients(
    b: Any, kind: str, address: str, clients: int, seconds: float, **cfg: Any
) -> dict[str, Any]:
    """``clients`` processes of ``kind`` (http-client | grpc-client); merged numbers."""
    tmp = b.dir("oip-clients")
    outs = [os.path.join(tmp, f"lat-{i}.bin") for i in range(clients)]
    base = {"address": address, "model": "id", "input": "input0", "shape": SHAPE,
            "root": ROOT, **cfg}  # fmt: skip
    ps = [_role(b, kind, {**base, "out": o}, kind, stdin=True) for o in outs]
    try:
        for p in ps:
            wait_ready(p, 1, 180, f"{kind} start-up")
        deadline = time.time() + 0.5 + seconds
        for p in ps:
            p.stdin.write(f"go {deadline!r}\n".encode())
            p.stdin.flush()
        results = [json.loads(readline(p, seconds + 120, f"{kind} run")) for p in ps]
    finally:
        for p in ps:
            b.procs.kill(p)
    lat = np.concatenate([np.fromfile(o, dtype=np.float64) for o in outs])
    n = int(sum(r["n"] for r in results))
    wall = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    return {
        "clients": clients, "requests": n, "wall_s": wall,
        "errors": int(sum(r["errors"] for r in results)),
        "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
        "rps": n / wall if wall > 0 else math.nan,
        "p50_us": float(np.percentile(lat, 50) * 1e6) if n else math.nan,
        "p99_us": float(np.percentile(lat, 99) * 1e6) if n else math.nan,
    }  # fmt: skip


def _row(b: Any, name: str, kind: str, address: str, clients: int, **cfg: Any) -> dict[str, Any]:
    row = run_oip_clients(b, kind, address, clients, b.seconds, **cfg)
    row = {"section": "oip", "name": name, **row}
    b.rows.append(row)
    flag = f"  ERRORS {row['errors']}: {row['first_error']}" if row["errors"] else ""
    print(f"  {name:<34} {clients:>3} client{'s' if clients > 1 else ' '} "
          f"{num(row['rps']):>8} req/s  p50 {num(row['p50_us']):>7} us  "
          f"p99 {num(row['p99_us']):>7} us{flag}", flush=True)  # fmt: skip
    return row


def input_name(address: str, model: str, timeout: float = 60.0) -> str:
    """The model's first input name from its OIP metadata (the model contract), as a
    client would read it; "input0" while the pool has no contract for the model."""
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/v2/models/{model}", timeout=timeout) as r:
        inputs = json.loads(r.read())["inputs"]
    return str(inputs[0]["name"]) if inputs else "input0"


def gateway_processes(asked: int) -> int:
    """What poold runs for ``oip_processes = asked`` (0: its auto rule)."""
    from pool.config import PoolConfig

    return PoolConfig(oip_processes=asked).gateway_count()


def gateway_opts(a: Any) -> dict[str, int]:
    """The pool settings ``--oip-processes`` and ``--oip-spin-us`` ask for (none: defaults)."""
    opts = {"oip_processes": a.oip_processes} if a.oip_processes else {}
    if a.oip_spin_us >= 0:
        opts["oip_spin_us"] = a.oip_spin_us
    return opts


def section_oip(b: Any) -> None:
    """The reference app and the pool run side by side and are measured in ``--rounds``
    interleaved rounds; a compared figure is the median over rounds (on a shared box a
    row moves by tens of percent from one minute to the next)."""
    from benchmodels import make_identity

    a = b.args
    d = b.dir("oip")
    model = make_identity(os.path.join(d, "id.pt"))
    many = max(a.clients)
    rounds = a.rounds or (1 if b.quick else 3)
    print(f"\n== oip: 1 KiB float32 {SHAPE} binary tensors, identity TorchScript, "
          f"{many} and 1 clients, {b.seconds:.1f} s per row, {rounds} interleaved round(s) "
          f"(figures: medians); pool: 1 CPU worker, max_batch {a.oip_max_batch}, "
          f"max_delay_ms {a.oip_max_delay_ms:g}", flush=True)  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {}
    procs = gateway_opts(a)
    print(f"   gateway processes per protocol: {gateway_processes(a.oip_processes)}"
          f"{' (auto)' if not a.oip_processes else ''}, oip_spin_us "
          f"{procs.get('oip_spin_us', 'default')}", flush=True)
    http, grpc = _free_port(), _free_port()
    cfg = {"name": "id", "path": model, "devices": ["cpu"], "threads": 1,
           "max_batch": a.oip_max_batch, "max_delay_ms": a.oip_max_delay_ms}  # fmt: skip
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(_server(b, "reference", {"model_path": model}, "reference"))
        pool = stack.enter_context(b.pool("oip-pool", [cfg], http=f"127.0.0.1:{http}",
                                          grpc=f"127.0.0.1:{grpc}", **procs))  # fmt: skip
        _wait_port(http)
        _wait_port(grpc)
        name = input_name(f"127.0.0.1:{http}", "id")
        load = Load("float32", SHAPE, model="id", seconds=b.seconds, warm=20, check_identity=True)
        for _ in range(rounds):
            for c in (many, 1):
                runs.setdefault(f"ref-{c}", []).append(_row(
                    b, "reference (starlette+torch)", "http-client", f"127.0.0.1:{ref}", c))
                runs.setdefault(f"http-{c}", []).append(_row(
                    b, "pool over OIP/HTTP", "http-client", f"127.0.0.1:{http}", c, input=name))
                runs.setdefault(f"grpc-{c}", []).append(_row(
                    b, "pool over OIP/gRPC", "grpc-client", f"127.0.0.1:{grpc}", c, input=name))
                runs.setdefault(f"zmq-{c}", []).append(
                    b.measure("oip", "pool over ZeroMQ", pool.frontend, c, load))  # fmt: skip

    def med(key: str, field: str) -> float:
        return float(statistics.median(row[field] for row in runs[key]))

    ref_rps = med(f"ref-{many}", "rps")
    for proto in ("http", "grpc"):
        b.compare(Compare("oip", f"req/s, {many} clients, {proto.upper()} binary", f"pool {proto}",
                          med(f"{proto}-{many}", "rps"), "starlette+torch", ref_rps, "req/s",
                          target=1.0))  # fmt: skip
    b.compare(Compare("oip", f"req/s, {many} clients", "pool zmq", med(f"zmq-{many}", "rps"),
                      "starlette+torch", ref_rps, "req/s", note="the same pool's ZeroMQ path"))
    for proto in ("http", "grpc"):
        b.compare(Compare("oip", f"p50, 1 client, {proto.upper()}", f"pool {proto}",
                          med(f"{proto}-1", "p50_us"), "pool zmq", med("zmq-1", "p50_us"),
                          "us", kind="diff", target=150.0,
                          note="target is for the GPU host"))  # fmt: skip
    b.compare(Compare("oip", "p50, 1 client", "starlette+torch", med("ref-1", "p50_us"),
                      "pool zmq", med("zmq-1", "p50_us"), "us", kind="diff",
                      note="the reference app, for scale"))  # fmt: skip
    servers(b, many)
    oip_batching(b)


def servers(b: Any, clients: int) -> None:
    """The HTTP server choice: each server parses the OIP request and echoes its input."""
    if b.quick:
        return
    found: dict[str, float] = {}
    for server in ("gateway", "asgi", "starlette", "aiohttp"):
        port = _free_port()
        p = _role(b, "echo", {"server": server, "port": port}, f"echo-{server}")
        try:
            wait_ready(p, 1, 60, f"echo {server}")
            _wait_port(port)
            row = _row(b, f"echo server: {server}", "http-client", f"127.0.0.1:{port}", clients)
            found[server] = row["rps"]
        finally:
            b.procs.kill(p)
    for other in ("asgi", "starlette", "aiohttp"):
        b.compare(Compare("oip", f"HTTP server, {clients} clients, no model",
                          "the gateway's own", found["gateway"], other, found[other], "req/s",
                          note="how the gateway's server was chosen"))  # fmt: skip


def oip_batching(b: Any) -> None:
    """resnet50 fp16 (GPU): 64 gRPC clients against 64 ZeroMQ clients of the same pool."""
    from bench_harness import gpu_device  # the same rules as the batching section

    dev = gpu_device(b, "oip batching")
    if dev is None or dev == "cpu":
        return
    if not b.info["torchvision"]:
        b.note("oip batching: skipped, torchvision is not installed")
        return
    from benchmodels import make_image_model

    a = b.args
    clients = a.batch_clients
    path = make_image_model(os.path.join(b.dir("oip-batching"), "net.pt"), resnet=True,
                            half=True, image=224)  # fmt: skip
    shape = [1, 3, 224, 224]
    grpc = _free_port()
    cfg = {"name": "id", "path": path, "devices": [dev], "max_batch": 64,
           "max_delay_ms": a.batch_delay_ms, "request_timeout_s": 120.0, "cuda_graphs": True}
    print(f"\n== oip batching: resnet50 fp16 on {dev}, {clients} clients x batch 1", flush=True)
    seconds = max(b.seconds, 5.0)
    procs = gateway_opts(a)
    with b.pool("oip-batching", [cfg], boot_timeout_s=600.0, grpc=f"127.0.0.1:{grpc}",
                **procs) as pool:  # fmt: skip
        _wait_port(grpc)
        name = grpc_input_name(f"127.0.0.1:{grpc}", "id")
        gateways = gateway_pids(pool.proc.pid)
        cpu0, host0 = cpu_seconds(gateways), psutil.cpu_times()
        g = run_oip_clients(b, "grpc-client", f"127.0.0.1:{grpc}", clients, seconds,
                            dtype="float16", shape=shape, check_identity=False, warm=5,
                            input=name)  # fmt: skip
        # whether the gateways or the host ran out of CPU: the next step differs
        gw_us = (cpu_seconds(gateways) - cpu0) / max(1, g["requests"]) * 1e6
        g = {"section": "oip", "name": "resnet50 over OIP/gRPC", **g,
             "gateway_processes": len(gateways), "gateway_cpu_us": gw_us,
             "host_busy": host_busy(host0, psutil.cpu_times())}  # fmt: skip
        b.rows.append(g)
        print(f"  gRPC: {num(g['rps'])} images/s, p50 {num(g['p50_us'])} us, errors "
              f"{g['errors']}; gateway cpu/req {num(gw_us)} us over {len(gateways)} "
              f"processes (warm-up included), host CPU busy {g['host_busy']:.0%}")  # fmt: skip
        load = Load("float16", shape, model="id", seconds=seconds, warm=5)
        z = b.measure("oip", "resnet50 over ZeroMQ", pool.frontend, clients, load)
    b.compare(Compare("oip", f"images/s, {clients} clients x batch 1", "pool grpc", g["rps"],
                      "pool zmq", z["rps"], "images/s", target=0.7))


def gateway_pids(poold: int) -> list[int]:
    """The gateway processes poold runs (``python -m gateway``)."""
    kids = psutil.Process(poold).children()
    return [k.pid for k in kids if "gateway" in " ".join(k.cmdline())]


def host_busy(before: Any, after: Any) -> float:
    """The fraction of the host's CPU time that was not idle between two cpu_times()."""
    total = sum(after) - sum(before)
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    return 1.0 - idle / total if total > 0 else math.nan


def grpc_input_name(address: str, model: str) -> str:
    """The same over gRPC (the GPU section runs no HTTP gateway)."""
    import grpc

    sys.path.insert(0, ROOT)
    from gateway.proto import grpc_predict_v2_pb2 as pb
    from gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=model), timeout=60
        )
    return meta.inputs[0].name if meta.inputs else "input0"
