"""The Open Inference Protocol endpoints, driven by the real tritonclient and curl.

One poold (http + grpc on, metrics on) serves every case in this module: an MLP (for
the upgrade), a float32 two-input two-output model, and a float16 + int64 model.
Input names come from the model metadata, as an OIP client would get them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import psutil
import pytest
from httpkit import NO_OPENSSL, OPENSSL, self_signed
from modelkit import make_mlp, make_two_input, mlp_input, mlp_reference
from oipkit import free_ports, gateway_pid, gateway_pids, make_half_long
from poolkit import Pool, running_pool, wait_for

# A test extra; a host with only the runtime packages (the GPU host) skips this file.
tgrpc = pytest.importorskip("tritonclient.grpc")
thttp = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = str(tmp_path_factory.mktemp("oip"))
    http, grpc, metrics = free_ports(3)
    models = [
        {"name": "mlp", "path": make_mlp(f"{tmp}/m/mlp-1.pt", 1), "version": "1"},
        {"name": "two", "path": make_two_input(f"{tmp}/m/two.pt"), "version": "7"},
        {"name": "mixed", "path": make_half_long(f"{tmp}/m/mixed.pt"), "version": "1"},
    ]
    make_mlp(f"{tmp}/m/mlp-2.pt", 2)
    with running_pool(
        tmp,
        models,
        http=f"127.0.0.1:{http}",
        grpc=f"127.0.0.1:{grpc}",
        metrics=f"127.0.0.1:{metrics}",
        oip_processes=1,  # one of each, whatever the cores (the kill test finds "the" pid)
    ) as p:
        p.env["OIP_HTTP"] = f"127.0.0.1:{http}"
        p.env["OIP_GRPC"] = f"127.0.0.1:{grpc}"
        p.env["METRICS"] = f"127.0.0.1:{metrics}"
        wait_for(lambda: _http_ready(p), 30, "the HTTP gateway ready")
        wait_for(lambda: _grpc_ready(p), 30, "the gRPC gateway ready")
        try:
            yield p
        finally:
            _close_clients()
            gateways = [gateway_pid(p.proc.pid, proto) for proto in ("http", "grpc")]
    # poold's shutdown stops its gateways too (SIGTERM, then a reap).
    assert all(pid and not psutil.pid_exists(pid) for pid in gateways), gateways


def _http_ready(p: Pool) -> bool:
    with thttp.InferenceServerClient(p.env["OIP_HTTP"]) as c:
        try:
            return bool(c.is_server_ready())
        except Exception:
            return False


def _grpc_ready(p: Pool) -> bool:
    with tgrpc.InferenceServerClient(p.env["OIP_GRPC"]) as c:
        try:
            return bool(c.is_server_ready())
        except Exception:
            return False


# One client per protocol and thread (neither client is meant for sharing across threads),
# closed when the module's pool stops: unclosed clients leave sockets to the collector.
CLIENTS: dict[tuple[str, int], Any] = {}


def _http(p: Pool) -> thttp.InferenceServerClient:
    key = ("http", threading.get_ident())
    if key not in CLIENTS:
        CLIENTS[key] = thttp.InferenceServerClient(p.env["OIP_HTTP"])
    return CLIENTS[key]


def _grpc(p: Pool) -> tgrpc.InferenceServerClient:
    key = ("grpc", threading.get_ident())
    if key not in CLIENTS:
        CLIENTS[key] = tgrpc.InferenceServerClient(p.env["OIP_GRPC"])
    return CLIENTS[key]


def _close_clients_of_this_thread() -> None:
    for proto in ("http", "grpc"):
        client = CLIENTS.pop((proto, threading.get_ident()), None)
        if client is not None:
            client.close()


def _close_clients() -> None:
    while CLIENTS:
        CLIENTS.popitem()[1].close()


def _input_names(p: Pool, model: str, count: int) -> list[str]:
    """The input names the model metadata gives (from the model contract)."""
    names = [i["name"] for i in _http(p).get_model_metadata(model)["inputs"]]
    assert len(names) == count, names
    return names


# ------------------------------------------------------------------ health, metadata


@pytest.mark.slow
def test_health_and_server_metadata(pool: Pool) -> None:
    h, g = _http(pool), _grpc(pool)
    assert h.is_server_live() and h.is_server_ready()
    assert g.is_server_live() and g.is_server_ready()
    assert h.is_model_ready("mlp") and g.is_model_ready("mlp")
    assert h.is_model_ready("mlp", "1") and g.is_model_ready("mlp", "1")
    assert not h.is_model_ready("mlp", "99") and not g.is_model_ready("mlp", "99")
    meta = h.get_server_metadata()
    assert meta["name"] == "gpu-pool" and "binary_tensor_data" in meta["extensions"]
    assert g.get_server_metadata().name == "gpu-pool"


def test_model_metadata_over_both(pool: Pool) -> None:
    _infer_http(pool, "two", [np.ones((1, 4), np.float32)] * 2)  # a contract after one request
    meta = _http(pool).get_model_metadata("two")
    assert meta["name"] == "two" and meta["versions"][0] == "7"
    gmeta = _grpc(pool).get_model_metadata("two", as_json=True)
    assert gmeta["name"] == "two" and gmeta["versions"][0] == "7"
    assert [i["name"] for i in gmeta.get("inputs", [])] == [i["name"] for i in meta["inputs"]]
    # From the model contract: forward(a, b) -> (a + b, a * b) on float32 [N, 4].
    assert meta["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "b", "datatype": "FP32", "shape": [-1, 4]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["output0", "output1"]
    assert [o["datatype"] for o in meta["outputs"]] == ["FP32", "FP32"]
    mixed = _http(pool).get_model_metadata("mixed")
    assert [(i["name"], i["datatype"]) for i in mixed["inputs"]] == [("a", "FP16"), ("b", "INT64")]
    assert [o["datatype"] for o in mixed["outputs"]] == ["FP16", "INT64"]
    with pytest.raises(InferenceServerException, match="NO_SUCH_MODEL"):
        _http(pool).get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        _http(pool).get_model_metadata("two", "6")
    with pytest.raises(InferenceServerException, match="NO_SUCH_MODEL"):
        _grpc(pool).get_model_metadata("nope")


# ------------------------------------------------------------------ inference


def _infer_http(
    p: Pool, model: str, arrays: list[np.ndarray], *, binary: bool = True, version: str = ""
) -> Any:
    names = _input_names(p, model, len(arrays))
    inputs = []
    for name, a in zip(names, arrays, strict=True):
        i = thttp.InferInput(name, list(a.shape), _datatype(a))
        i.set_data_from_numpy(a, binary_data=binary)
        inputs.append(i)
    outputs = None
    if not binary:
        outputs = [thttp.InferRequestedOutput(f"output{k}", binary_data=False) for k in range(2)]
        outputs = outputs[: 1 if model == "mlp" else 2]
    return _http(p).infer(model, inputs, model_version=version, outputs=outputs)


def _infer_grpc(p: Pool, model: str, arrays: list[np.ndarray], version: str = "") -> Any:
    names = _input_names(p, model, len(arrays))
    inputs = []
    for name, a in zip(names, arrays, strict=True):
        i = tgrpc.InferInput(name, list(a.shape), _datatype(a))
        i.set_data_from_numpy(a)
        inputs.append(i)
    return _grpc(p).infer(model, inputs, model_version=version)


def _datatype(a: np.ndarray) -> str:
    return {"float32": "FP32", "float16": "FP16", "int64": "INT64"}[a.dtype.name]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_matches_the_model(pool: Pool, binary: bool) -> None:
    x = mlp_input(3)
    r = _infer_http(pool, "mlp", [x], binary=binary)
    np.testing.assert_allclose(r.as_numpy("output0"), mlp_reference(1, x), rtol=1e-5, atol=1e-6)
    assert r.get_response()["model_version"] == "1"


def test_grpc_infer_matches_the_model(pool: Pool) -> None:
    x = mlp_input(2)
    r = _infer_grpc(pool, "mlp", [x])
    np.testing.assert_allclose(r.as_numpy("output0"), mlp_reference(1, x), rtol=1e-5, atol=1e-6)
    assert r.get_response().model_version == "1"


@pytest.mark.parametrize("proto", ["http", "http-json", "grpc"])
def test_two_inputs_two_outputs(pool: Pool, proto: str) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 3.0, np.float32)
    if proto == "grpc":
        r = _infer_grpc(pool, "two", [a, b])
    else:
        r = _infer_http(pool, "two", [a, b], binary=proto == "http")
    out = [r.as_numpy(n) for n in _output_names(pool, "two")]
    np.testing.assert_array_equal(out[0], a + b)
    np.testing.assert_array_equal(out[1], a * b)


def test_grpc_large_raw_inputs_reach_the_model_whole(pool: Pool) -> None:
    """Two 256 KiB inputs of different types: ModelInfer's deserializer walks the request
    and passes each raw input on, in order, as a view of the received bytes
    (gateway/grpc_wire.py)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((64, 2048)).astype(np.float16)
    b = rng.integers(-(2**40), 2**40, (64, 512), dtype=np.int64)
    r = _infer_grpc(pool, "mixed", [a, b])
    half, long = (r.as_numpy(n) for n in _output_names(pool, "mixed"))
    np.testing.assert_array_equal(half, a * 2)
    np.testing.assert_array_equal(long, b + 1)


def _output_names(p: Pool, model: str) -> list[str]:
    return [o["name"] for o in _http(p).get_model_metadata(model)["outputs"]]


@pytest.mark.parametrize("proto", ["http", "http-json", "grpc"])
def test_float16_and_int64(pool: Pool, proto: str) -> None:
    a = np.array([[0.5, -1.25, 3.0, 65504 / 4]], np.float16)
    b = np.array([[-(2**40), -1, 0, 2**62]], np.int64)
    if proto == "grpc":
        r = _infer_grpc(pool, "mixed", [a, b])
    else:
        r = _infer_http(pool, "mixed", [a, b], binary=proto == "http")
    half, long = (r.as_numpy(n) for n in _output_names(pool, "mixed"))
    assert half.dtype == np.float16 and long.dtype == np.int64
    np.testing.assert_array_equal(half, a * 2)
    np.testing.assert_array_equal(long, b + 1)


def test_grpc_typed_contents(pool: Pool) -> None:
    """Typed ``contents`` instead of raw bytes (what clients other than tritonclient send),
    built with tritonclient's own generated messages: the wire is the same."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    a = [0.5, -1.25, 3.0, 7.0]
    b = [-(2**40), -1, 0, 2**62]
    req = pb.ModelInferRequest(model_name="mixed")
    for name, dtype in (("a", "FP16"), ("b", "INT64")):
        t = req.inputs.add(name=name, datatype=dtype, shape=[1, 4])
        if dtype == "INT64":
            t.contents.int64_contents.extend(b)
    req.inputs[0].contents.fp32_contents.extend(a)  # FP16 has no typed field: refused
    with grpc.insecure_channel(pool.env["OIP_GRPC"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(req, timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "FP16 has no typed contents" in (exc.value.details() or "")
        two = pb.ModelInferRequest(model_name="two")
        for name, values in (("a", [1.0, 2.0, 3.0, 4.0]), ("b", [10.0, 20.0, 30.0, 40.0])):
            two.inputs.add(name=name, datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
                values
            )
        reply = stub.ModelInfer(two, timeout=30)
    assert reply.model_version == "7" and [o.name for o in reply.outputs] == ["output0", "output1"]
    sums = np.frombuffer(reply.raw_output_contents[0], np.float32)
    assert sums.tolist() == [11.0, 22.0, 33.0, 44.0]


# ------------------------------------------------------------------ errors


def test_errors_have_the_mapped_status(pool: Pool) -> None:
    x = mlp_input(1)
    some = thttp.InferInput("x", [1, 16], "FP32")
    some.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="NO_SUCH_MODEL") as exc:
        _http(pool).infer("nope", [some])
    assert exc.value.status() == "404"
    with pytest.raises(InferenceServerException, match="not serving") as exc:
        _infer_http(pool, "mlp", [x], version="2")
    assert exc.value.status() == "404"
    with pytest.raises(InferenceServerException, match="not serving") as exc:
        _infer_grpc(pool, "mlp", [x], version="2")
    assert exc.value.status() == "StatusCode.NOT_FOUND"
    wrong = mlp_input(1, in_features=5)  # the model wants 16 features
    with pytest.raises(InferenceServerException, match="MODEL_ERROR") as exc:
        _infer_grpc(pool, "mlp", [wrong])
    assert exc.value.status() == "StatusCode.INTERNAL"
    # Names decide positions: b given first still lands in forward's second argument.
    a, b = np.ones((1, 4), np.float16), np.full((1, 4), 5, np.int64)
    ins = [tgrpc.InferInput("b", [1, 4], "INT64"), tgrpc.InferInput("a", [1, 4], "FP16")]
    ins[0].set_data_from_numpy(b)
    ins[1].set_data_from_numpy(a)
    r = _grpc(pool).infer("mixed", ins)
    np.testing.assert_array_equal(r.as_numpy("output1"), b + 1)
    ins[1] = tgrpc.InferInput("a", [1, 4], "FP32")
    ins[1].set_data_from_numpy(a.astype(np.float32))
    with pytest.raises(InferenceServerException, match="'a' must be FP16") as exc:
        _grpc(pool).infer("mixed", ins)
    assert exc.value.status() == "StatusCode.INVALID_ARGUMENT"
    bad = thttp.InferInput(_input_names(pool, "mlp", 1)[0], [1, 16], "UINT32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.uint32))
    with pytest.raises(InferenceServerException, match="BAD_REQUEST.*UINT32") as exc:
        _http(pool).infer("mlp", [bad])
    assert exc.value.status() == "400"


def _curl(*args: str) -> tuple[int, str]:
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-s", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
def test_curl(pool: Pool, tmp_path: Any) -> None:
    base = f"http://{pool.env['OIP_HTTP']}"
    assert _curl(f"{base}/v2/health/live")[0] == 200
    assert _curl(f"{base}/v2/health/ready")[0] == 200
    code, body = _curl(f"{base}/v2/models/mlp")
    assert code == 200 and json.loads(body)["name"] == "mlp"
    name = _input_names(pool, "mlp", 1)[0]
    x = mlp_input(1)
    request = {"inputs": [{"name": name, "shape": [1, 16], "datatype": "FP32",
                           "data": x.ravel().tolist()}]}  # fmt: skip
    code, body = _curl("-X", "POST", "-d", json.dumps(request), f"{base}/v2/models/mlp/infer")
    assert code == 200, body
    reply = json.loads(body)
    assert reply["model_version"] == "1" and reply["outputs"][0]["name"] == "output0"
    got = np.array(reply["outputs"][0]["data"], np.float32).reshape(reply["outputs"][0]["shape"])
    np.testing.assert_allclose(got, mlp_reference(1, x), rtol=1e-5, atol=1e-6)
    # The binary extension by hand: a JSON header, then the raw bytes.
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": [1, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 64},
                }
            ],
            "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
        }
    )
    body_path = tmp_path / "body.bin"  # fmt: skip
    body_path.write_bytes(head.encode() + x.tobytes())
    out = subprocess.run(
        [CURL, "-s", "-D", "-", "-X", "POST", "--data-binary", f"@{body_path}",
         "-H", f"Inference-Header-Content-Length: {len(head)}", f"{base}/v2/models/mlp/infer"],
        capture_output=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    headers, _, payload = out.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                      if line.lower().startswith(b"inference-header-content-length")))  # fmt: skip
    meta = json.loads(payload[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 16
    got = np.frombuffer(payload[length:], np.float32).reshape(1, 4)
    np.testing.assert_allclose(got, mlp_reference(1, x), rtol=1e-5, atol=1e-6)
    code, body = _curl("-X", "POST", "-d", "{not json", f"{base}/v2/models/mlp/infer")
    assert code == 400 and "BAD_REQUEST" in body
    code, body = _curl("-X", "POST", "-d", json.dumps(request), f"{base}/v2/models/nope/infer")
    assert code == 404 and "NO_SUCH_MODEL" in body


def test_metrics_per_protocol(pool: Pool) -> None:
    _infer_http(pool, "mlp", [mlp_input(1)])
    _infer_grpc(pool, "mlp", [mlp_input(1)])

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{pool.env['METRICS']}/metrics", timeout=5) as r:
            text: str = r.read().decode()
        return text

    def counted() -> bool:
        text = scrape()
        return all(
            f'gpupool_oip_requests_total{{code="OK",model="mlp",protocol="{proto}"}}' in text
            for proto in ("http", "grpc")
        )

    wait_for(counted, 10, "OIP request counters for both protocols")
    text = scrape()
    assert 'gpupool_oip_gateway_up{protocol="http"} 1.0' in text
    assert 'gpupool_oip_request_seconds_count{protocol="grpc"}' in text


# ------------------------------------------------------------------ supervision


@pytest.mark.slow
def test_a_killed_gateway_comes_back(pool: Pool) -> None:
    pid = gateway_pid(pool.proc.pid, "http")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gateway_pid(pool.proc.pid, "http") not in (None, pid), 20, "a new gateway")
    wait_for(lambda: _http_ready(pool), 20, "the new gateway ready")
    assert _infer_http(pool, "mlp", [mlp_input(1)]).get_response()["model_version"] == "1"
    # The gRPC gateway and the ZeroMQ path never noticed.
    assert _infer_grpc(pool, "mlp", [mlp_input(1)]).get_response().model_version == "1"
    with pool.client() as zmq_client:
        assert zmq_client.infer("mlp", mlp_input(1)).version == "1"
    # pool-ctl status shows both gateways, the restart and the new pid.
    status = json.loads(pool.pool_ctl("status", "--json").stdout)
    shown = {g["protocol"]: g for g in status["gateways"]}
    assert set(shown) == {"http", "grpc"}
    assert shown["http"]["up"] and shown["http"]["pid"] == gateway_pid(pool.proc.pid, "http")
    assert shown["http"]["restarts"] >= 1 and "SIGKILL" in shown["http"]["last_exit"]
    assert shown["grpc"]["listen"] == pool.env["OIP_GRPC"] and shown["grpc"]["up"]
    text = pool.pool_ctl("status").stdout
    assert "OIP gateways" in text and pool.env["OIP_HTTP"] in text


# ------------------------------------------------------------------ zero-loss upgrades


class OipLoad:
    """Clients on threads calling one model over HTTP or gRPC without pause."""

    def __init__(self, p: Pool, clients: int) -> None:
        self.pool = p
        self.stop_flag = threading.Event()
        self.errors: list[str] = []
        self.versions: list[list[str]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> OipLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)

    def _run(self, idx: int) -> None:
        grpc = idx % 2 == 1
        x = mlp_input(1, seed=idx)
        refs = {v: mlp_reference(int(v), x) for v in ("1", "2")}
        while not self.stop_flag.is_set():
            try:
                if grpc:
                    r = _infer_grpc(self.pool, "mlp", [x])
                    version = r.get_response().model_version
                else:
                    r = _infer_http(self.pool, "mlp", [x])
                    version = r.get_response()["model_version"]
                np.testing.assert_allclose(
                    r.as_numpy("output0"), refs[version], rtol=1e-5, atol=1e-6
                )
            except Exception as exc:  # every failure counts, whatever raised it
                self.errors.append(f"client {idx} ({'grpc' if grpc else 'http'}): {exc!r}")
                continue
            self.versions[idx].append(version)
        _close_clients_of_this_thread()

    def answered(self) -> int:
        return sum(len(v) for v in self.versions)


@pytest.mark.slow
def test_upgrade_and_rollback_under_http_and_grpc_load(pool: Pool) -> None:
    new = os.path.join(pool.dir, "m", "mlp-2.pt")
    with OipLoad(pool, 4) as load:
        wait_for(lambda: load.answered() >= 20, 30, "load running")
        up = pool.pool_ctl("upgrade", "mlp", new, "--version", "2", "--strategy", "surge")
        assert up.returncode == 0, up.stdout + up.stderr
        before = load.answered()
        wait_for(lambda: load.answered() >= before + 20, 30, "answers after the upgrade")
        back = pool.pool_ctl("rollback", "mlp")
        assert back.returncode == 0, back.stdout + back.stderr
        before = load.answered()
        wait_for(lambda: load.answered() >= before + 20, 30, "answers after the rollback")
    assert load.errors == []
    for seen in load.versions:
        # Per client: 1s, then 2s, then 1s again; never a step back inside the sequence.
        runs = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
        assert runs in (["1", "2", "1"], ["1", "2"], ["2", "1"], ["1"]), runs
    assert any("2" in seen for seen in load.versions)


@pytest.mark.slow
def test_several_gateways_share_a_port_and_all_exit_with_poold(tmp_path: Any) -> None:
    """oip_processes = 2: two HTTP gateways on one port (SO_REUSEPORT) serve fresh
    connections; poold's SIGKILL (the lifeline) leaves neither behind."""
    (http,) = free_ports(1)
    models = [{"name": "mlp", "path": make_mlp(f"{tmp_path}/mlp.pt", 1), "version": "1"}]
    with running_pool(str(tmp_path), models, http=f"127.0.0.1:{http}", oip_processes=2) as p:
        pids = wait_for(
            lambda: len(gateway_pids(p.proc.pid, "http")) == 2 and gateway_pids(p.proc.pid, "http"),
            20,
            "two HTTP gateways",
        )
        p.env["OIP_HTTP"] = f"127.0.0.1:{http}"
        wait_for(lambda: _http_ready(p), 30, "the gateways ready")
        x = mlp_input(1)
        for _ in range(20):  # a new connection each time: the kernel picks a process
            with thttp.InferenceServerClient(p.env["OIP_HTTP"]) as c:
                name = c.get_model_metadata("mlp")["inputs"][0]["name"]
                i = thttp.InferInput(name, [1, 16], "FP32")
                i.set_data_from_numpy(x)
                assert c.infer("mlp", [i]).get_response()["model_version"] == "1"
        gone = [psutil.Process(pid) for pid in pids]
        os.kill(p.proc.pid, signal.SIGKILL)
        p.proc.wait(10)
        wait_for(
            lambda: all(not g.is_running() or g.status() == psutil.STATUS_ZOMBIE for g in gone),
            10,
            "the gateways to exit after poold",
        )



@pytest.mark.slow
@pytest.mark.skipif(OPENSSL is None, reason=NO_OPENSSL)
def test_tls_and_bearer_token_on_both_protocols(tmp_path: Any) -> None:
    """oip_tls_cert/key serve HTTPS and gRPC over TLS; oip_token_file makes every call but
    health need the token, over both."""
    import ssl

    cert, key = self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    http, grpc = free_ports(2)
    models = [{"name": "mlp", "path": make_mlp(f"{tmp_path}/m/mlp.pt", 1), "version": "1"}]
    opts = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "oip_tls_cert": str(cert),
            "oip_tls_key": str(key), "oip_token_file": str(token)}  # fmt: skip
    with running_pool(str(tmp_path), models, **opts) as p:
        ctx = ssl.create_default_context(cafile=str(cert))
        base = f"https://127.0.0.1:{http}"

        def get(path: str, auth: str = "") -> int:
            req = urllib.request.Request(
                base + path, headers={"Authorization": auth} if auth else {}
            )
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)
            except OSError:
                return 0

        wait_for(lambda: get("/v2/health/ready") == 200, 30, "the HTTPS gateway ready")
        assert get("/v2/models/mlp") == 401
        assert get("/v2/models/mlp", "Bearer wrong") == 401
        assert get("/v2/models/mlp", "Bearer s3cret-token") == 200
        # Plain HTTP on the TLS port gets no answer.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=5)
        c = tgrpc.InferenceServerClient(f"localhost:{grpc}", ssl=True, root_certificates=str(cert))
        try:
            wait_for(lambda: _ok(c.is_server_live), 30, "the gRPC TLS gateway")
            x = mlp_input(1)
            i = tgrpc.InferInput("input", [1, 16], "FP32")
            i.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
                c.infer("mlp", [i])
            r = c.infer("mlp", [i], headers={"authorization": "Bearer s3cret-token"})
            np.testing.assert_allclose(
                r.as_numpy("output0"), mlp_reference(1, x), rtol=1e-5, atol=1e-6
            )
        finally:
            c.close()
        assert p.proc.poll() is None


def _ok(call: Any) -> bool:
    try:
        return bool(call())
    except Exception:
        return False


@pytest.mark.slow
def test_spinning_gateways_serve_both_protocols_and_stop_with_poold(tmp_path: Any) -> None:
    """oip_spin_us: each gateway runs on the spinning selector (gateway/spin_loop.py), not
    uvloop. The real clients get the two-input model's answers over both protocols, and
    poold's SIGTERM still stops both gateways (their signal handlers are the loop's)."""
    http, grpc = free_ports(2)
    models = [{"name": "two", "path": make_two_input(f"{tmp_path}/m/two.pt"), "version": "7"}]
    opts = {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "oip_processes": 1,
            "oip_spin_us": 300}  # fmt: skip
    with running_pool(str(tmp_path), models, **opts) as p:
        p.env["OIP_HTTP"], p.env["OIP_GRPC"] = opts["http"], opts["grpc"]
        wait_for(lambda: _http_ready(p) and _grpc_ready(p), 30, "both gateways ready")
        pids = [gateway_pid(p.proc.pid, proto) for proto in ("http", "grpc")]
        for pid in pids:
            argv = psutil.Process(pid).cmdline()
            assert argv[argv.index("--spin-us") + 1] == "300"
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        b = np.full((2, 4), 3.0, np.float32)
        try:
            for _ in range(50):
                g = _infer_grpc(p, "two", [a, b])
                h = _infer_http(p, "two", [a, b], binary=True)
                assert g.get_response().model_version == h.get_response()["model_version"] == "7"
                for r in (g, h):
                    out = [r.as_numpy(n) for n in _output_names(p, "two")]
                    np.testing.assert_array_equal(out[0], a + b)
                    np.testing.assert_array_equal(out[1], a * b)
        finally:
            _close_clients_of_this_thread()
        p.proc.send_signal(signal.SIGTERM)
        p.proc.wait(30)
    assert all(pid and not psutil.pid_exists(pid) for pid in pids), pids
