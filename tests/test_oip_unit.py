"""The OIP gateway's parts without a pool: the .proto against tritonclient's, the error
table, the config rules, the REST API over a fake router, and the gateway supervisor."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import os
import re
import signal
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from gateway.catalog import Catalog, model_info
from gateway.errors import STATUS
from gateway.http_api import HttpApi
from gateway.stats import Stats
from gateway.tensors import WireTensor
from gateway.upstream import Reply
from pool import gateways as gw
from pool.config import ConfigError, load_config
from router import protocol as p

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ the .proto


def _fields(desc: Any, prefix: str = "") -> dict[str, tuple[int, int, bool]]:
    out = {}
    for f in desc.fields:
        out[f"{prefix}{desc.name}.{f.name}"] = (f.number, f.type, f.is_repeated)
    for nested in desc.nested_types:
        out.update(_fields(nested, f"{prefix}{desc.name}."))
    return out


def test_our_proto_matches_tritonclient_field_for_field() -> None:
    """Same names, numbers and types for every field we declare, and the same service
    methods, so tritonclient.grpc and any spec-built client speak to us unchanged."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from tritonclient.grpc import service_pb2 as triton

    # Parse our generated module's serialized descriptor into a private pool: importing
    # both modules would register two files defining inference.* in the default pool.
    text = (ROOT / "gateway/proto/grpc_predict_v2_pb2.py").read_text()
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", text, re.S)
    assert match
    proto = descriptor_pb2.FileDescriptorProto.FromString(eval(match.group(1)))
    ours = descriptor_pool.DescriptorPool()
    ours.Add(proto)
    assert proto.package == "inference"
    for message in proto.message_type:
        mine = _fields(ours.FindMessageTypeByName(f"inference.{message.name}"))
        theirs = _fields(triton.DESCRIPTOR.message_types_by_name[message.name])
        assert {k: v for k, v in theirs.items() if k in mine} == mine, message.name
    service = ours.FindServiceByName("inference.GRPCInferenceService")
    theirs_methods = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    for method in service.methods:
        other = theirs_methods[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"
    }  # fmt: skip


def test_every_router_error_code_has_an_http_and_grpc_status() -> None:
    assert p.ERROR_CODES <= STATUS.keys()
    doc = (ROOT / "docs/PROTOCOL.md").read_text()
    for code, mapping in STATUS.items():
        assert re.search(rf"`{code}` \| {mapping.http} \| `{mapping.grpc.name}`", doc), code


def test_bfloat16_from_json_rounds_to_nearest_even() -> None:
    from gateway.tensors import from_values, to_array

    # 1 + 2**-8 lies halfway between bfloat16 1.0 and 1 + 2**-7: ties go to the even 1.0;
    # 1 + 3 * 2**-8 lies halfway between 1 + 2**-7 and 1 + 2**-6: to the even 1 + 2**-6.
    t = from_values("bfloat16", (4,), [1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5])
    assert np.frombuffer(t.data, "<u2").tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020]
    assert to_array(t).tolist() == [1.0, 1.0, 1 + 2**-6, -2.5]


# ------------------------------------------------------------------ config


def _config(tmp_path: Path, **pool: Any) -> Any:
    lines = ["[pool]", f'state_dir = "{tmp_path}/state"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in pool.items()]
    path = tmp_path / "pool.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(str(path), env={})


def _problems(tmp_path: Path, **pool: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        _config(tmp_path, **pool)
    return exc.value.problems


def test_oip_config_defaults_off_and_loopback_is_fine(tmp_path: Path) -> None:
    assert _config(tmp_path).pool.http == "" and _config(tmp_path).pool.grpc == ""
    cfg = _config(tmp_path, http="127.0.0.1:8000", grpc="[::1]:8001")
    assert (cfg.pool.http, cfg.pool.grpc) == ("127.0.0.1:8000", "[::1]:8001")


@pytest.mark.parametrize("key", ["http", "grpc"])
def test_non_loopback_oip_needs_tls_or_an_explicit_insecure(tmp_path: Path, key: str) -> None:
    (problem,) = _problems(tmp_path, **{key: "0.0.0.0:8000"})
    assert problem.startswith(f"pool.{key}: refusing to serve the Open Inference Protocol")
    assert _config(tmp_path, **{key: "0.0.0.0:8000", "oip_insecure": True}).pool.oip_insecure
    cert, key_file = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key_file.write_text("x")
    tls = _config(
        tmp_path, **{key: "0.0.0.0:8000"}, oip_tls_cert=str(cert), oip_tls_key=str(key_file)
    )
    assert tls.pool.oip_tls_cert == str(cert)


def test_oip_config_mistakes_are_named(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert _problems(tmp_path, oip_tls_cert=str(cert)) == [
        "pool.oip_tls_cert: must be set together with pool.oip_tls_key"
    ]
    assert _problems(tmp_path, http="127.0.0.1:0")[0].startswith(
        'pool.http: must be "" (off) or HOST:PORT with a port 1..65535'
    )
    assert _problems(tmp_path, http="127.0.0.1:9", grpc="127.0.0.1:9") == [
        "pool.grpc: must differ from pool.http"
    ]
    assert "no such file" in _problems(tmp_path, oip_token_file=str(tmp_path / "none"))[0]


def test_the_demo_turns_both_protocols_on_and_says_where(tmp_path: Path) -> None:
    from pool.poold import demo_oip, oip_banner

    cfg = _config(tmp_path)
    demo = dataclasses.replace(cfg, pool=demo_oip(cfg.pool))
    assert (demo.pool.http, demo.pool.grpc) == ("127.0.0.1:8000", "127.0.0.1:8001")
    assert oip_banner(demo).splitlines() == [
        "Open Inference Protocol over HTTP: http://127.0.0.1:8000/v2",
        "Open Inference Protocol over gRPC: 127.0.0.1:8001",
    ]
    mine = _config(tmp_path, http="127.0.0.1:9000")
    assert demo_oip(mine.pool).http == "127.0.0.1:9000"  # the config's choice stands
    assert oip_banner(cfg) == ""


# ------------------------------------------------------------------ REST over a fake router


class FakeUpstream:
    """Answers like the router: adds 1 to a float32 input; remembers what it was sent."""

    def __init__(self, version: str = "3") -> None:
        self.version = version
        self.sent: list[list[WireTensor]] = []

    async def infer(self, model: str, inputs: list[WireTensor], timeout_s: float | None) -> Reply:
        self.sent.append(inputs)
        out = [
            WireTensor(t.dtype, t.shape, (np.frombuffer(t.data, np.float32) + 1).tobytes())
            for t in inputs
        ]
        return Reply(True, self.version, tuple(out))


CONTRACT = {
    "name": "m",
    "version": "3",
    "versions": [{"version": "3", "digest": "d", "inputs": [], "outputs": []}],
    "inputs": [
        {"name": "a", "dtype": "float32", "shape": [-1, 2], "batch_dim": 0},
        {"name": "b", "dtype": "float32", "shape": [-1, 2], "batch_dim": 0},
    ],
    "outputs": [
        {"name": "sum", "dtype": "float32", "shape": [-1, 2], "batch_dim": 0},
        {"name": "", "dtype": "float32", "shape": [-1, 2], "batch_dim": 0},
    ],
    "batching": {"batchable": True, "max_batch": 8, "max_delay_ms": 2.0},
    "devices": ["cpu"],
}


async def _control(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    if cmd == "status":
        return {
            "ok": True,
            "data": {"models": [{"name": "m", "status": "serving", "version": "3"}]},
        }
    if cmd == "describe":
        return {"ok": True, "data": CONTRACT}
    return {"ok": True, "data": {}}


def _api(token: str = "") -> tuple[HttpApi, FakeUpstream]:
    up = FakeUpstream()
    return HttpApi(up, Catalog(_control), Stats(), token=token), up  # type: ignore[arg-type]


def _call(api: HttpApi, method: str, path: str, body: bytes = b"", **headers: str) -> Any:
    return asyncio.run(
        api.handle(method, path, {k.replace("_", "-"): v for k, v in headers.items()}, body)
    )


def test_metadata_comes_from_the_contract() -> None:
    info = model_info({"name": "m", "status": "serving", "version": "3"}, CONTRACT)
    assert [s.name for s in info.at("").inputs] == ["a", "b"]
    assert [s.name for s in info.at("").outputs] == ["sum", "output1"]  # unnamed: outputN
    api, _ = _api()
    meta = json.loads(_call(api, "GET", "/v2/models/m").body)
    assert meta["inputs"][0] == {"name": "a", "datatype": "FP32", "shape": [-1, 2]}
    assert _call(api, "GET", "/v2/models/m/versions/4").status == 404


def test_inputs_are_matched_by_name_and_binary_sizes_are_checked() -> None:
    api, up = _api()
    a, b = np.ones((1, 2), np.float32), np.full((1, 2), 5, np.float32)
    head = json.dumps({"inputs": [
        {"name": "b", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
        {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 1]},
    ], "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    r = _call(api, "POST", "/v2/models/m/infer", head + b.tobytes(),
              inference_header_content_length=str(len(head)))  # fmt: skip
    assert r.status == 200, r.body
    sent = up.sent[-1]
    assert bytes(sent[0].data) == a.tobytes() and bytes(sent[1].data) == b.tobytes()  # a, b order
    n = int(dict(r.headers)[b"inference-header-content-length"])
    reply = json.loads(r.body[:n])
    assert [o["name"] for o in reply["outputs"]] == ["sum", "output1"]
    assert np.frombuffer(r.body[n:], np.float32).tolist() == [2, 2, 6, 6]
    # One byte too many, one too few, and a name the model does not have.
    for extra, size in ((b"x", 8), (b"", 12)):
        bad = head.replace(b'"binary_data_size": 8', f'"binary_data_size": {size}'.encode())
        r = _call(api, "POST", "/v2/models/m/infer", bad + b.tobytes() + extra,
                  inference_header_content_length=str(len(bad)))  # fmt: skip
        assert r.status == 400 and b"BAD_REQUEST" in r.body
    r = _call(api, "POST", "/v2/models/m/infer", json.dumps({"inputs": [
        {"name": "c", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}).encode())  # fmt: skip
    assert r.status == 400 and b"missing a, b; unknown c" in r.body


def test_positional_names_still_work_once_the_contract_names_the_inputs() -> None:
    """A client that read the metadata before the contract was known sent input0, input1."""
    api, up = _api()

    def tensor(name: str, data: list[float]) -> dict[str, Any]:
        return {"name": name, "datatype": "FP32", "shape": [1, 2], "data": data}

    body = json.dumps({"inputs": [tensor("input0", [1, 2]), tensor("input1", [3, 4])]}).encode()
    assert _call(api, "POST", "/v2/models/m/infer", body).status == 200
    assert np.frombuffer(up.sent[-1][1].data, np.float32).tolist() == [3, 4]
    one = json.dumps({"inputs": [tensor("input0", [1, 2])]}).encode()
    r = _call(api, "POST", "/v2/models/m/infer", one)
    assert r.status == 400 and b"takes 2 inputs (a, b)" in r.body


def test_unknown_names_do_not_turn_into_a_control_call_each() -> None:
    calls: list[str] = []

    async def counting(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        calls.append(cmd)
        return await _control(cmd, args)

    api = HttpApi(FakeUpstream(), Catalog(counting), Stats())  # type: ignore[arg-type]

    async def many() -> list[int]:
        return [(await api.handle("GET", "/v2/models/nope", {}, b"")).status for _ in range(50)]

    assert asyncio.run(many()) == [404] * 50
    assert calls.count("status") <= 2  # the first fetch, and at most one forced refresh


def test_gzip_bodies_and_bearer_tokens() -> None:
    api, _ = _api(token="s3cret")
    body = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
        {"name": "b", "datatype": "FP32", "shape": [1, 2], "data": [3, 4]}]}).encode()  # fmt: skip
    assert _call(api, "POST", "/v2/models/m/infer", body).status == 401
    assert _call(api, "GET", "/v2/models/m", authorization="Bearer wrong").status == 401
    assert _call(api, "GET", "/v2/health/live").status == 200  # probes need no token
    r = _call(api, "POST", "/v2/models/m/infer", gzip.compress(body),
              authorization="Bearer s3cret", content_encoding="gzip")  # fmt: skip
    assert r.status == 200
    assert json.loads(r.body)["outputs"][0]["data"] == [2.0, 3.0]


def test_a_body_over_the_limit_is_refused_unread() -> None:
    """Over the real server: a declared length over the limit is refused on the headers,
    a chunked body as it passes the limit; neither reaches the router."""
    from httpkit import connect, read_answer, serving

    from gateway.http_wire import Limits

    api, up = _api()
    body = json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
        {"name": "b", "datatype": "FP32", "shape": [1, 2], "data": [3, 4]}]}).encode()  # fmt: skip
    with serving(api.handle, Limits(max_body=len(body))) as s:
        with connect(s.port) as c:
            c.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
            c.sendall(body)  # exactly the limit
            ok = read_answer(c.makefile("rb"))
            assert ok.status == 200 and json.loads(ok.body)["outputs"][0]["data"] == [2.0, 3.0]
        with connect(s.port) as c:
            c.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                      % (len(body) + 1))  # fmt: skip
            refused = read_answer(c.makefile("rb"))
            assert refused.status == 413 and "BAD_REQUEST" in json.loads(refused.body)["error"]
        with connect(s.port) as c:
            c.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            c.sendall(b"%x\r\n%s\r\n" % (len(body), body))
            c.sendall(b"1\r\n \r\n0\r\n\r\n")  # one byte more
            assert read_answer(c.makefile("rb")).status == 413
    assert len(up.sent) == 1


# ------------------------------------------------------------------ the supervisor


def test_a_dying_gateway_is_restarted_with_growing_back_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pids = iter(range(1000, 2000))
    spawned: list[list[str]] = []

    def fake_spawn(path: str, argv: list[str], env: Any, **kw: Any) -> int:
        spawned.append(argv)
        assert kw["setsid"] and kw["file_actions"][0][2] == gw.LIFELINE_FD
        return next(pids)

    monkeypatch.setattr(os, "posix_spawn", fake_spawn)
    monkeypatch.setattr(gw, "_signal", lambda pid, sig: spawned.append([f"kill {pid} {sig.name}"]))
    cfg = _config(tmp_path, http="127.0.0.1:8000", oip_processes=1)
    sup = gw.Gateways(gw.gateway_specs(cfg.pool, str(tmp_path)), lifeline_r=9)
    sup.start()
    (g,) = sup.gateways
    assert g.state is gw.GatewayState.STARTING and "--protocol" in spawned[0]
    sup.on_exited(1000, signal.SIGSEGV, now=10.0)
    assert g.state is gw.GatewayState.WAITING and g.restart_at == 10.0 + gw.RESTART_MIN_S
    sup.tick(10.1)
    assert len(spawned) == 1  # not yet
    sup.tick(10.0 + gw.RESTART_MIN_S)
    assert g.pid == 1001 and g.restarts == 1
    sup.on_exited(1001, 1 << 8, now=11.0)
    assert g.restart_at == 11.0 + 2 * gw.RESTART_MIN_S  # doubled
    (shown,) = sup.summary()  # what pool-ctl status prints
    assert shown["pid"] is None and not shown["up"] and shown["state"] == "waiting"
    assert shown["restarts"] == 1 and shown["last_exit"] == "exit code 1"
    sup.tick(100.0)
    sup.stop()
    assert g.state is gw.GatewayState.STOPPING and spawned[-1] == ["kill 1002 SIGTERM"]
    sup.on_exited(1002, 0)
    assert sup.stopped() and sup.supervision() == {"http": (0, 2)}
    with pytest.raises(RuntimeError):
        g.to(gw.GatewayState.STARTING)  # stopped is final


def test_oip_processes_share_one_port(tmp_path: Path) -> None:
    cfg = _config(tmp_path, http="127.0.0.1:8000", grpc="127.0.0.1:8001", oip_processes=3)
    specs = gw.gateway_specs(cfg.pool, str(tmp_path))
    assert [s.protocol for s in specs] == ["http"] * 3 + ["grpc"] * 3
    assert all(s.reuse_port and "--reuse-port" in s.argv() for s in specs)
    assert len({s.stats_path for s in specs}) == 6  # one snapshot each, summed at scrape
    one = _config(tmp_path, http="127.0.0.1:8000", oip_processes=1)
    single = gw.gateway_specs(one.pool, str(tmp_path))
    assert not single[0].reuse_port and "--reuse-port" not in single[0].argv()
    assert "0 (auto) or an integer from 1 to 64" in _problems(tmp_path, oip_processes=65)[0]
    assert "0 (auto)" in _problems(tmp_path, oip_processes=-1)[0]


def test_oip_spin_us_reaches_every_gateway(tmp_path: Path) -> None:
    off = gw.gateway_specs(_config(tmp_path, http="127.0.0.1:8000").pool, str(tmp_path))
    assert off[0].spin_us == 0 and "--spin-us" not in off[0].argv()  # the default: off
    cfg = _config(tmp_path, http="127.0.0.1:8000", grpc="127.0.0.1:8001", oip_spin_us=150)
    for spec in gw.gateway_specs(cfg.pool, str(tmp_path)):
        argv = spec.argv()
        assert argv[argv.index("--spin-us") + 1] == "150"
    assert "from 0 to 10000" in _problems(tmp_path, oip_spin_us=20_000)[0]


def test_oip_processes_auto_follows_the_cores(tmp_path: Path) -> None:
    pool = _config(tmp_path, http="127.0.0.1:8000").pool
    assert pool.oip_processes == 0  # the default: auto
    for cores, want in ((1, 1), (2, 1), (7, 1), (8, 2), (16, 4), (64, 4)):
        with mock.patch("os.sched_getaffinity", return_value=set(range(cores))):
            assert pool.gateway_count() == want, cores
            specs = gw.gateway_specs(pool, str(tmp_path))
            assert len(specs) == want and all(s.reuse_port == (want > 1) for s in specs)


def test_the_collector_sums_processes_of_one_protocol(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from gateway.collector import OipCollector

    for i, n in enumerate((3, 4)):
        stats = Stats(str(tmp_path / f"oip-http-{i}.json"))
        for _ in range(n):
            stats.begin("http")
            stats.end("http", "m", "OK", stats.now())
        stats.write()
    registry = CollectorRegistry()
    registry.register(OipCollector(str(tmp_path), lambda: {"http": (2, 1)}))
    text = generate_latest(registry).decode()
    assert 'gpupool_oip_requests_total{code="OK",model="m",protocol="http"} 7.0' in text
    assert 'gpupool_oip_request_seconds_count{protocol="http"} 7.0' in text
    assert 'gpupool_oip_gateway_up{protocol="http"} 2.0' in text


@pytest.mark.slow
def test_the_gateway_never_imports_torch() -> None:
    """It must start in a fraction of torch's import time and hold no CUDA context (and
    it serves HTTP with its own server: uvicorn is only the benchmarks' reference)."""
    import subprocess
    import sys

    code = (
        "import sys, gateway.main, gateway.http_api, gateway.grpc_api, gateway.collector, "
        "gateway.http_server, pool.gateways; sys.exit('torch' in sys.modules or "
        "'uvicorn' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
