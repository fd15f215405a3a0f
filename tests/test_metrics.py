"""pool.metrics rendered and parsed back, and scraped over real HTTP via pool.http."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from typing import NoReturn, TypeVar

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pool import metrics as metrics_mod
from pool.http import HttpEndpoint, parse_address, serve_http
from pool.metrics import PoolMetrics, PoolSnapshot, WorkerSample

Samples = dict[str, list[Sample]]


def parse(text: bytes) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and sample name -> samples."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for fam in text_string_to_metric_families(text.decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples.setdefault(s.name, []).append(s)
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    matches = [s.value for s in samples.get(name, []) if s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {matches} in {samples.get(name)}"
    return matches[0]


def worker(pid: int, state: str = "serving", **kw: object) -> WorkerSample:
    base: dict[str, object] = dict(
        model="resnet",
        version="3",
        generation=1,
        device="cuda:0",
        state=state,
        pid=pid,
        gpu_bytes=1 << 30,
        rss_bytes=500 << 20,
        inflight=2,
        served=100,
    )
    base.update(kw)
    return WorkerSample(**base)  # type: ignore[arg-type]


@pytest.fixture
def recorded() -> PoolMetrics:
    m = PoolMetrics()
    m.observe_request("resnet", "3", "OK", 0.0001, 0.004)  # 0.0001 is a bound
    m.observe_request("resnet", "3", "OK", 0.00002, 0.03)
    m.observe_request("resnet", "", "OVERLOADED", 0.0, 0.00001)
    m.observe_request("bert", "7", "OK", 0.001, 0.002)
    m.observe_request("resnet", "3", "OK", 99.0, 100.0)  # past the last bound
    for size in (1, 3, 32, 1000):
        m.observe_batch("resnet", size)
    m.observe_upgrade(
        "resnet",
        "upgrade",
        "committed",
        {"start": 1.2, "warm": 0.2, "drain": 0.05},
        bytes_freed=768 << 20,
    )
    m.observe_upgrade("resnet", "rollback", "rolled_back", {"start": 0.4}, bytes_freed=-5)
    m.observe_worker_exit("resnet", "retired")
    m.observe_worker_exit("resnet", "retired")
    m.observe_worker_exit("bert", "crashed")
    m.publish(
        PoolSnapshot(
            workers=(
                worker(101),
                worker(102, device="cuda:1", inflight=0, served=7),
                worker(103, state="starting", version="4", generation=2, gpu_bytes=None),
                worker(
                    201, model="bert", version="7", device="cpu", gpu_bytes=None, rss_bytes=None
                ),
            ),
            queue_depth={"resnet": 5, "bert": 0},
            model_state={"resnet": "upgrading", "bert": "serving", "old": "failed"},
        )
    )
    return m


def test_counters(recorded: PoolMetrics) -> None:
    types, s = parse(recorded.render())
    assert types["gpupool_requests"] == "counter"
    assert value(s, "gpupool_requests_total", model="resnet", version="3", code="OK") == 3
    assert value(s, "gpupool_requests_total", model="resnet", version="", code="OVERLOADED") == 1
    assert value(s, "gpupool_requests_total", model="bert", version="7", code="OK") == 1
    assert (
        value(s, "gpupool_upgrades_total", model="resnet", kind="upgrade", outcome="committed") == 1
    )
    assert (
        value(s, "gpupool_upgrades_total", model="resnet", kind="rollback", outcome="rolled_back")
        == 1
    )
    # A negative "freed" is clamped: counters never go down.
    assert value(s, "gpupool_upgrade_bytes_freed_total", model="resnet") == 768 << 20
    assert value(s, "gpupool_worker_exits_total", model="resnet", reason="retired") == 2
    assert value(s, "gpupool_worker_exits_total", model="bert", reason="crashed") == 1


def test_latency_histograms(recorded: PoolMetrics) -> None:
    types, s = parse(recorded.render())
    for fam in ("queue", "worker_wait", "compute"):
        assert types[f"gpupool_request_{fam}_seconds"] == "histogram"
    assert types["gpupool_request_duration_seconds"] == "histogram"

    def bucket(name: str, le: str, model: str = "resnet") -> float:
        return value(s, f"{name}_bucket", model=model, le=le)

    q = "gpupool_request_queue_seconds"
    # Buckets are cumulative and `le` is inclusive: 2e-5 lands in 5e-05, 1e-4 (exactly a
    # bound) in 0.0001, 99 s only in +Inf. The OVERLOADED rejection is in none of them.
    assert bucket(q, "5e-05") == 1
    assert bucket(q, "0.0001") == 2
    assert bucket(q, "60.0") == 2
    assert bucket(q, "+Inf") == 3
    assert value(s, f"{q}_count", model="resnet") == 3
    assert value(s, f"{q}_sum", model="resnet") == pytest.approx(99.00012)

    d = "gpupool_request_duration_seconds"
    assert bucket(d, "5e-05") == 0
    assert bucket(d, "0.005") == 1
    assert bucket(d, "0.05") == 2
    assert bucket(d, "+Inf") == 3
    # Rejections are counted apart, and still in requests_total.
    assert value(s, "gpupool_requests_rejected_total", model="resnet", code="OVERLOADED") == 1
    assert value(s, "gpupool_requests_total", model="resnet", version="", code="OVERLOADED") == 1
    assert bucket(d, "0.0025", model="bert") == 1
    bounds = [float(x.labels["le"]) for x in s[f"{d}_bucket"] if x.labels["model"] == "bert"]
    assert bounds[0] == 5e-05 and bounds[-2] == 60.0 and bounds[-1] == float("inf")


def test_batch_and_phase_histograms(recorded: PoolMetrics) -> None:
    _, s = parse(recorded.render())
    b = "gpupool_batch_size_bucket"
    les = [x.labels["le"] for x in s[b] if x.labels["model"] == "resnet"]
    assert les == [
        "1.0",
        "2.0",
        "4.0",
        "8.0",
        "16.0",
        "32.0",
        "64.0",
        "128.0",
        "256.0",
        "512.0",
        "+Inf",
    ]
    assert value(s, b, model="resnet", le="1.0") == 1
    assert value(s, b, model="resnet", le="4.0") == 2
    assert value(s, b, model="resnet", le="32.0") == 3
    assert value(s, b, model="resnet", le="512.0") == 3
    assert value(s, b, model="resnet", le="+Inf") == 4
    assert value(s, "gpupool_batch_size_sum", model="resnet") == 1036

    p = "gpupool_upgrade_phase_seconds"
    assert value(s, f"{p}_count", model="resnet", phase="start") == 2
    assert value(s, f"{p}_sum", model="resnet", phase="start") == pytest.approx(1.6)
    assert value(s, f"{p}_bucket", model="resnet", phase="start", le="0.5") == 1
    assert value(s, f"{p}_bucket", model="resnet", phase="drain", le="0.05") == 1


def test_gauges_from_snapshot(recorded: PoolMetrics) -> None:
    types, s = parse(recorded.render())
    assert types["gpupool_queue_depth"] == "gauge"
    assert value(s, "gpupool_queue_depth", model="resnet") == 5
    assert value(s, "gpupool_queue_depth", model="bert") == 0
    # Up means "answers requests": an upgrade keeps the old version serving.
    assert value(s, "gpupool_model_up", model="resnet") == 1
    assert value(s, "gpupool_model_up", model="bert") == 1
    assert value(s, "gpupool_model_up", model="old") == 0
    assert value(s, "gpupool_model_state", model="old", state="failed") == 1
    assert value(s, "gpupool_workers", model="resnet", state="serving") == 2
    assert value(s, "gpupool_workers", model="resnet", state="starting") == 1
    assert value(s, "gpupool_workers", model="bert", state="serving") == 1

    w = {"model": "resnet", "version": "3", "device": "cuda:1", "pid": "102"}
    assert value(s, "gpupool_worker_gpu_bytes", **w) == 1 << 30
    assert value(s, "gpupool_worker_rss_bytes", **w) == 500 << 20
    assert value(s, "gpupool_worker_inflight", **w) == 0
    assert value(s, "gpupool_worker_served_total", **w) == 7
    # Unknown memory is left out, not reported as 0.
    gpu_pids = {x.labels["pid"] for x in s["gpupool_worker_gpu_bytes"]}
    assert gpu_pids == {"101", "102"}
    assert {x.labels["pid"] for x in s["gpupool_worker_rss_bytes"]} == {"101", "102", "103"}
    assert 0 <= value(s, "gpupool_snapshot_age_seconds") < 60


def test_emptied_worker_state_reports_zero(recorded: PoolMetrics) -> None:
    recorded.render()
    recorded.publish(
        PoolSnapshot(
            workers=(worker(104, version="4"),),
            queue_depth={"resnet": 0},
            model_state={"resnet": "serving"},
        )
    )
    _, s = parse(recorded.render())
    assert value(s, "gpupool_workers", model="resnet", state="serving") == 1
    assert value(s, "gpupool_workers", model="resnet", state="starting") == 0
    # bert is gone from the pool: its series go away instead of lingering at 0.
    assert not [x for x in s["gpupool_workers"] if x.labels["model"] == "bert"]
    assert {x.labels["pid"] for x in s["gpupool_worker_inflight"]} == {"104"}


def test_before_first_publish_and_private_registry() -> None:
    m = PoolMetrics()
    types, s = parse(m.render())
    assert "gpupool_requests" in types and "gpupool_requests_total" not in s
    assert "gpupool_queue_depth" not in types  # no snapshot yet, no invented gauges
    assert "process_cpu_seconds" in types  # poold's own process metrics ride along
    assert PoolMetrics().registry is not m.registry
    assert REGISTRY.get_sample_value("gpupool_requests_total") is None


def test_model_label_cardinality_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_mod, "MAX_MODELS", 2)
    m = PoolMetrics()
    for name in ("a", "b", "c", "d"):
        m.observe_request(name, "", "NO_SUCH_MODEL", 0.0, 0.0)
    m.observe_batch("e", 1)
    _, s = parse(m.render())
    models = {x.labels["model"] for x in s["gpupool_requests_total"]}
    assert models == {"a", "b", metrics_mod.OVERFLOW_MODEL}
    assert (
        value(
            s,
            "gpupool_requests_total",
            model=metrics_mod.OVERFLOW_MODEL,
            version="",
            code="NO_SUCH_MODEL",
        )
        == 2
    )


K = TypeVar("K")
V = TypeVar("V")


class LiveDict(dict[K, V]):
    """A dict that refuses to be iterated in place; ``dict.copy()`` (C) still works."""

    def items(self) -> NoReturn:
        raise AssertionError("the scrape iterated a dict the loop may be growing")

    keys = values = items


def test_scrape_reads_copies_of_live_state(recorded: PoolMetrics) -> None:
    """The scrape thread must copy every dict the loop writes before iterating it.

    Iterating a dict while the loop inserts a new label set raises "dictionary changed
    size during iteration" in the scrape; a copy is one C call, atomic under the GIL.
    A stress test can't hit that window reliably, so make in-place iteration fail here.
    """
    m = recorded
    for stats in m._models.values():
        stats.requests = LiveDict(stats.requests)
    m._models = LiveDict(m._models)
    m._upgrades = LiveDict(m._upgrades)
    m._phases = LiveDict(m._phases)
    m._bytes_freed = LiveDict(m._bytes_freed)
    m._exits = LiveDict(m._exits)
    _, s = parse(m.render())
    assert value(s, "gpupool_requests_total", model="resnet", version="3", code="OK") == 3
    # The loop keeps writing through the wrappers.
    m.observe_request("new", "1", "OK", 0.0, 0.0)
    m.observe_upgrade("new", "restart", "committed", {"start": 1.0}, 0)
    m.observe_worker_exit("new", "crashed")
    _, s = parse(m.render())
    assert value(s, "gpupool_worker_exits_total", model="new", reason="crashed") == 1


def test_scrape_concurrent_with_loop() -> None:
    """Smoke test with real threads: scrapes and writes interleave without errors."""
    m = PoolMetrics()
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                m.render()
            except BaseException as exc:  # keep scraping; report to the main thread
                errors.append(exc)

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(1_000):
            model = f"m{i // 10}"
            m.observe_request(model, str(i), "OK", 0.001, 0.003)
            m.observe_batch(model, i % 64 + 1)
    finally:
        stop.set()
        t.join(10)
    assert errors == []
    _, s = parse(m.render())
    assert sum(x.value for x in s["gpupool_requests_total"]) == 1_000


# -- HTTP ------------------------------------------------------------------------------


class Health:
    def __init__(self) -> None:
        self.alive, self.ready, self.reason = True, False, "loading resnet"

    def __call__(self) -> tuple[bool, bool, str]:
        if self.reason == "boom":
            raise RuntimeError("health check broke")
        return self.alive, self.ready, self.reason


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def endpoint(recorded: PoolMetrics, health: Health) -> Iterator[HttpEndpoint]:
    ep = serve_http("127.0.0.1:0", recorded, health)
    yield ep
    ep.close()


def get(ep: HttpEndpoint, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", ep.port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def test_http_metrics_scrape(endpoint: HttpEndpoint) -> None:
    assert endpoint.port > 0
    status, ctype, body = get(endpoint, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    _, s = parse(body)
    assert value(s, "gpupool_requests_total", model="resnet", version="3", code="OK") == 3
    assert get(endpoint, "/metrics?name[]=x")[0] == 200


def test_http_health_probes(
    endpoint: HttpEndpoint, health: Health, capsys: pytest.CaptureFixture[str]
) -> None:
    assert get(endpoint, "/healthz")[::2] == (200, b"ok\n")
    assert get(endpoint, "/readyz")[::2] == (503, b"loading resnet\n")
    health.ready, health.reason = True, "serving 2 models"
    assert get(endpoint, "/readyz")[::2] == (200, b"serving 2 models\n")
    health.alive, health.ready, health.reason = False, False, "event loop stalled"
    assert get(endpoint, "/healthz")[::2] == (503, b"event loop stalled\n")
    assert get(endpoint, "/readyz")[0] == 503
    health.reason = "boom"
    assert get(endpoint, "/healthz")[0] == 500

    assert get(endpoint, "/")[0] == 404
    assert get(endpoint, "/metrics/extra")[0] == 404
    assert get(endpoint, "/metrics", method="POST")[0] == 405
    status, _, body = get(endpoint, "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    # Access logs go to the module logger at DEBUG, never to stderr.
    assert capsys.readouterr().err == ""


def test_http_close_stops_thread(recorded: PoolMetrics, health: Health) -> None:
    ep = serve_http("127.0.0.1:0", recorded, health)
    port = ep.port
    assert get(ep, "/healthz")[0] == 200
    ep.close()
    ep.close()  # idempotent
    assert not any(t.name == "gpupool-http" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/healthz")
        finally:
            conn.close()


def test_port_in_use_fails_at_start(
    endpoint: HttpEndpoint, recorded: PoolMetrics, health: Health
) -> None:
    with pytest.raises(OSError):
        serve_http(f"127.0.0.1:{endpoint.port}", recorded, health)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9400", ("127.0.0.1", 9400)),
        (":9400", ("", 9400)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9400", "host:", "host:http", "host:70000"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)


def test_batches_reported_in_bulk_count_each_forward() -> None:
    m = PoolMetrics()
    m.observe_batch("bulk", 8, 3)
    m.observe_batch("bulk", 1)
    _, samples = parse(m.render())
    assert value(samples, "gpupool_batch_size_count", model="bulk") == 4
    assert value(samples, "gpupool_batch_size_sum", model="bulk") == 25
    assert value(samples, "gpupool_batch_size_bucket", model="bulk", le="8.0") == 4
    assert value(samples, "gpupool_batch_size_bucket", model="bulk", le="4.0") == 1


def test_build_info_devices_openmetrics_and_forgetting(recorded: PoolMetrics) -> None:
    snap = recorded._published[0] if recorded._published else None
    assert snap is not None
    recorded.publish(
        PoolSnapshot(
            workers=snap.workers,
            queue_depth=snap.queue_depth,
            model_state=snap.model_state,
            devices={"cuda:0": (0.75, 3 << 30, 80 << 30), "cuda:1": (None, 1 << 30, 80 << 30)},
        )
    )
    _, s = parse(recorded.render())
    (info,) = s["gpupool_build_info"]
    assert info.value == 1 and info.labels["version"] and info.labels["python"]
    assert value(s, "gpupool_gpu_utilization_ratio", device="cuda:0") == 0.75
    assert not [x for x in s["gpupool_gpu_utilization_ratio"] if x.labels["device"] == "cuda:1"]
    assert value(s, "gpupool_gpu_memory_used_bytes", device="cuda:1") == 1 << 30
    body, ctype = recorded.render_for("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
    assert recorded.render_for("text/plain")[1].startswith("text/plain")
    recorded.forget_model("bert")
    _, s = parse(recorded.render())
    # What the loop recorded for it is gone (the gauges go with the next snapshot).
    for name in ("gpupool_requests_total", "gpupool_worker_exits_total"):
        assert not [x for x in s[name] if x.labels["model"] == "bert"], name
    assert not [
        x for x in s["gpupool_request_duration_seconds_count"] if x.labels["model"] == "bert"
    ]
    assert [x for x in s["gpupool_requests_total"] if x.labels["model"] == "resnet"]
