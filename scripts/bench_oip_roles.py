#!/usr/bin/env python3
"""Child processes of the OIP bench (scripts/bench_oip.py): load clients and servers.

usage: bench_oip_roles.py ROLE JSON_CONFIG

Roles:
  http-client   closed-loop keep-alive HTTP/1.1 client (http.client) sending one prebuilt
                OIP binary request; prints "ready", waits for "go DEADLINE" on stdin, then
                prints a JSON summary and writes its latencies (float64 seconds) to "out"
  grpc-client   the same over gRPC (ModelInfer with raw_input_contents)
  reference     the reference server: uvicorn + starlette, one process, the same
                TorchScript model called in-process (the way most teams serve a model)
  echo          a server with no model that answers a parsed OIP binary request with its
                own input, to compare HTTP servers (cfg "server": gateway | asgi | starlette |
                aiohttp; gateway = the gateway's own server, gateway/http_server.py)
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

HEADER = "Inference-Header-Content-Length"


def oip_body(name: str, shape: list[int]) -> tuple[bytes, int]:
    """A binary OIP request for one float32 input (ones): (body, JSON header length)."""
    data = np.ones(shape, np.float32).tobytes()
    head = json.dumps({
        "inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    return head + data, len(head)


def _wait_go() -> float:
    print(f"ready {os.getpid()}", flush=True)
    line = sys.stdin.readline().split()
    return float(line[1])


def _report(lat: list[float], errors: int, first: str, t0: float, t1: float, out: str) -> None:
    np.asarray(lat, np.float64).tofile(out)
    print(json.dumps({"n": len(lat), "errors": errors, "first_error": first,
                      "t_start": t0, "t_end": t1}), flush=True)  # fmt: skip


def http_client(cfg: dict[str, Any]) -> None:
    import http.client

    body, head_len = oip_body(cfg["input"], cfg["shape"])
    host, port = cfg["address"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    headers = {HEADER: str(head_len), "Content-Type": "application/octet-stream"}
    path = f"/v2/models/{cfg['model']}/infer"
    want = np.ones(cfg["shape"], np.float32).tobytes()

    def once() -> str:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        payload = resp.read()
        if resp.status != 200:
            return f"HTTP {resp.status}: {payload[:200]!r}"
        n = int(resp.getheader(HEADER) or 0)
        return "" if payload[n:] == want else "wrong output bytes"

    for _ in range(cfg.get("warm", 20)):
        once()
    deadline = _wait_go()
    lat: list[float] = []
    errors, first = 0, ""
    t0 = time.time()
    while time.time() < deadline:
        s = time.perf_counter()
        problem = once()
        lat.append(time.perf_counter() - s)
        if problem:
            errors += 1
            first = first or problem
    _report(lat, errors, first, t0, time.time(), cfg["out"])


def grpc_client(cfg: dict[str, Any]) -> None:
    import grpc

    sys.path.insert(0, cfg["root"])
    from gateway.proto import grpc_predict_v2_pb2 as pb
    from gateway.proto import grpc_predict_v2_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(cfg["address"])
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    dtype = cfg.get("dtype", "float32")
    data = np.ones(cfg["shape"], dtype).tobytes()
    request = pb.ModelInferRequest(
        model_name=cfg["model"],
        inputs=[pb.ModelInferRequest.InferInputTensor(
            name=cfg["input"], datatype={"float32": "FP32", "float16": "FP16"}[dtype],
            shape=cfg["shape"])],
        raw_input_contents=[data],
    )  # fmt: skip
    infer = stub.ModelInfer
    check = cfg.get("check_identity", True)

    def once() -> str:
        try:
            r = infer(request, timeout=120)
        except grpc.RpcError as exc:
            return f"{exc.code()}: {exc.details()}"
        return "" if not check or r.raw_output_contents[0] == data else "wrong output bytes"

    for _ in range(cfg.get("warm", 20)):
        once()
    deadline = _wait_go()
    lat: list[float] = []
    errors, first = 0, ""
    t0 = time.time()
    while time.time() < deadline:
        s = time.perf_counter()
        problem = once()
        lat.append(time.perf_counter() - s)
        if problem:
            errors += 1
            first = first or problem
    _report(lat, errors, first, t0, time.time(), cfg["out"])


def _parse(headers: Any, body: bytes) -> tuple[dict[str, Any], bytes]:
    n = int(headers.get(HEADER.lower()) or headers.get(HEADER) or len(body))
    return json.loads(body[:n]), body[n:]


def _answer(model: str, request: dict[str, Any], out: bytes) -> tuple[bytes, dict[str, str]]:
    spec = request["inputs"][0]
    head = json.dumps({
        "model_name": model, "model_version": "1",
        "outputs": [{"name": "output0", "datatype": "FP32", "shape": spec["shape"],
                     "parameters": {"binary_data_size": len(out)}}],
    }).encode()  # fmt: skip
    return head + out, {HEADER: str(len(head)), "content-type": "application/octet-stream"}


def reference(cfg: dict[str, Any]) -> None:
    """What a team writes in an afternoon: starlette + uvicorn + torch in one process."""
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    torch.set_num_threads(1)
    model = torch.jit.load(cfg["model_path"]).eval()

    async def infer(request: Request) -> Response:
        req, raw = _parse(request.headers, await request.body())
        x = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(req["inputs"][0]["shape"])
        with torch.inference_mode():
            y = model(x)
        body, headers = _answer("id", req, y.contiguous().numpy().tobytes())
        return Response(body, headers=headers)

    app = Starlette(routes=[Route("/v2/models/{name}/infer", infer, methods=["POST"])])
    _serve_uvicorn(app, cfg["port"])


def _serve_uvicorn(app: Any, port: int) -> None:
    import uvicorn

    print(f"ready {os.getpid()}", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop", lifespan="off")  # fmt: skip


def echo(cfg: dict[str, Any]) -> None:
    server = cfg["server"]
    if server == "aiohttp":
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            req, raw = _parse(request.headers, await request.read())
            body, headers = _answer("id", req, raw)
            return web.Response(body=body, headers=headers)

        app = web.Application()
        app.router.add_post("/v2/models/{name}/infer", handle)
        print(f"ready {os.getpid()}", flush=True)
        import uvloop

        uvloop.install()
        web.run_app(app, host="127.0.0.1", port=cfg["port"], access_log=None, print=None)
    elif server == "gateway":
        import asyncio

        import uvloop

        from gateway.http_api import Response as GatewayResponse
        from gateway.http_server import HttpServer
        from gateway.http_wire import Limits

        async def answer(method: str, path: str, headers: dict[str, str],
                         body: bytes) -> GatewayResponse:  # fmt: skip
            req, raw = _parse(headers, body)
            out, extra = _answer("id", req, raw)
            return GatewayResponse(200, out, [(k.encode(), v.encode()) for k, v in extra.items()])

        async def serve() -> None:
            await HttpServer(answer, Limits()).start("127.0.0.1", cfg["port"])
            print(f"ready {os.getpid()}", flush=True)
            await asyncio.Event().wait()

        uvloop.run(serve())
    elif server == "starlette":
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import Response
        from starlette.routing import Route

        async def infer(request: Request) -> Response:
            req, raw = _parse(request.headers, await request.body())
            body, headers = _answer("id", req, raw)
            return Response(body, headers=headers)

        _serve_uvicorn(Starlette(routes=[Route("/v2/models/{name}/infer", infer,
                                               methods=["POST"])]), cfg["port"])  # fmt: skip
    else:  # a bare ASGI callable, as the gateway uses

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            chunks = []
            while True:
                msg = await receive()
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            req, raw = _parse(headers, b"".join(chunks))
            body, extra = _answer("id", req, raw)
            hdrs = [(k.encode(), v.encode()) for k, v in extra.items()]
            hdrs.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": hdrs})
            await send({"type": "http.response.body", "body": body})

        _serve_uvicorn(app, cfg["port"])


ROLES = {"http-client": http_client, "grpc-client": grpc_client, "reference": reference,
         "echo": echo}  # fmt: skip

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
