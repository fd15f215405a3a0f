"""Production operation against a real poold: systemd notify, metrics, health, config
checks, environment overrides, reload, and pool-ctl's behaviour when poold is down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import start_pool, wait_for, write_config
from prometheus_client.parser import text_string_to_metric_families

from router.client import Client

# Every test here starts a real pool: the full suite, not the fast tier.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_systemd_notify_ready_watchdog_stopping_in_order(tmp_path: object, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=1)
    sock_path = os.path.join(d, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 0.2 s
    pool = start_pool(
        d, [{"name": "m", "path": m, "devices": ["cpu"]}], wait=False, keep_notify=True
    )
    try:
        seen: list[str] = []
        while not any(x.startswith("READY=1") for x in seen):
            seen.append(sock.recv(4096).decode())
        ready_at = len(seen)
        # READY only once the model serves.
        assert pool.model("m")["status"] == "serving"
        while sum("WATCHDOG=1" in x for x in seen[ready_at:]) < 2:
            seen.append(sock.recv(4096).decode())
        # systemctl reload (ExecReload sends SIGHUP): RELOADING=1, then READY=1 again.
        reload_at = len(seen)
        pool.proc.send_signal(signal.SIGHUP)
        while not any(x.startswith("READY=1") for x in seen[reload_at:]):
            seen.append(sock.recv(4096).decode())
        reloading = [i for i, x in enumerate(seen) if i >= reload_at and "RELOADING=1" in x]
        ready_again = [i for i, x in enumerate(seen) if i >= reload_at and x.startswith("READY=1")]
        assert reloading and reloading[0] < ready_again[0], seen[reload_at:]
        pool.proc.terminate()
        while not any(x.startswith("STOPPING=1") for x in seen):
            seen.append(sock.recv(4096).decode())
        assert pool.proc.wait(30) == 0
    finally:
        pool.stop()
        sock.close()
    first = {
        key: next(i for i, x in enumerate(seen) if x.startswith(key))
        for key in ("READY=1", "WATCHDOG=1", "STOPPING=1")
    }
    assert first["READY=1"] < first["STOPPING=1"]
    assert any(x.startswith("STATUS=") for x in seen)
    assert first["WATCHDOG=1"] < first["STOPPING=1"]


def test_metrics_and_health_endpoints(tmp_path: object) -> None:
    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=1)
    port = free_port()
    pool = start_pool(
        d,
        [{"name": "m", "path": m, "version": "1", "devices": ["cpu", "cpu"]}],
        metrics=f"127.0.0.1:{port}",
    )
    try:
        with Client(pool.frontend) as c:
            for _ in range(20):
                c.infer("m", mlp_input(1))
            try:
                c.infer("missing", mlp_input(1))
            except Exception:
                pass
        base = f"http://127.0.0.1:{port}"

        def scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
            text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
            out: dict[str, list[tuple[dict[str, str], float]]] = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    out.setdefault(s.name, []).append((s.labels, s.value))
            return out

        # The snapshot is published once a second: one that shows both workers ready may
        # still predate the requests, so wait for the one that counts them.
        samples = wait_for(
            lambda: _counted(_ready_workers(scrape()), 20),
            10,
            "a snapshot with both workers ready and the 21 requests counted",
        )
        ok = [
            v
            for lab, v in samples["gpupool_requests_total"]
            if lab == {"model": "m", "version": "1", "code": "OK"}
        ]
        assert ok and ok[0] >= 20
        assert any(
            lab.get("code") == "NO_SUCH_MODEL" for lab, _ in samples["gpupool_requests_total"]
        )
        assert "gpupool_request_duration_seconds_bucket" in samples
        assert any(
            lab == {"model": "m", "state": "ready"} and v == 2
            for lab, v in samples["gpupool_workers"]
        )
        counted = wait_for(
            lambda: (
                sum(
                    v
                    for lab, v in scrape().get("gpupool_batch_size_count", [])
                    if lab.get("model") == "m"
                )
                >= 20
            ),
            10,
            "batch sizes",
        )
        assert counted
        rss = samples["gpupool_worker_rss_bytes"]
        assert len(rss) == 2 and all(v > 0 for _, v in rss)
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200
        assert pool.pool_ctl("health").returncode == 0
    finally:
        pool.stop()


def _counted(samples: object, n: int) -> object:
    """The scrape, once it counts at least ``n`` OK requests of model m and the request
    for a missing model."""
    if not isinstance(samples, dict):
        return None
    totals = samples.get("gpupool_requests_total", [])
    ok = sum(v for lab, v in totals if lab == {"model": "m", "version": "1", "code": "OK"})
    missing = any(lab.get("code") == "NO_SUCH_MODEL" for lab, _ in totals)
    return samples if ok >= n and missing else None


def _ready_workers(samples: dict[str, list[tuple[dict[str, str], float]]]) -> object:
    """The scrape, once the published snapshot shows both workers ready (it is ~1 s old)."""
    workers = samples.get("gpupool_workers", [])
    ready = any(lab == {"model": "m", "state": "ready"} and v == 2 for lab, v in workers)
    return samples if ready else None


def test_check_config_reports_every_problem(tmp_path: object) -> None:
    d = str(tmp_path)
    cfg = write_config(
        os.path.join(d, "bad.toml"),
        {"frontend": "tcp://0.0.0.0:5555", "drain_timeout": 3},
        [{"name": "m", "path": os.path.join(d, "missing.pt"), "max_batch": 0}],
    )
    out = subprocess.run(
        [sys.executable, "-m", "pool.poold", "--check-config", cfg],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    for key in ("pool.frontend", "pool.drain_timeout", "models[0].path", "models[0].max_batch"):
        assert key in out.stderr, out.stderr
    good = write_config(os.path.join(d, "good.toml"), {}, [])
    out = subprocess.run(
        [sys.executable, "-m", "pool.poold", "--check-config", good],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "ok" in out.stdout


def test_env_overrides_and_reload_through_zero_loss_paths(tmp_path: object) -> None:
    d = str(tmp_path)
    a = make_mlp(os.path.join(d, "models", "a.pt"), seed=1)
    b = make_mlp(os.path.join(d, "models", "b.pt"), seed=2)
    pool = start_pool(
        d,
        [{"name": "a", "path": a, "version": "1", "devices": ["cpu"]}],
        frontend="ipc:///nonexistent/overridden.sock",
        wait=False,
        env_extra={"GPU_POOL_FRONTEND": f"ipc://{d}/env-front.sock"},
    )
    pool.frontend = f"ipc://{d}/env-front.sock"
    try:
        pool.wait_serving()
        with Client(pool.frontend) as c:
            assert c.infer("a", mlp_input(1)).version == "1"
        # Edit the config: upgrade a, add b; then SIGHUP.
        write_config(
            pool.config,
            _pool_section(pool.config),
            [
                {"name": "a", "path": b, "version": "2", "devices": ["cpu"]},
                {"name": "b", "path": a, "version": "1", "devices": ["cpu"]},
            ],
        )
        out = pool.pool_ctl("reload", "--json")
        assert out.returncode == 0, out.stderr
        # The reload answers once what it started has finished, one outcome per model.
        outcomes = {o["model"]: o["outcome"] for o in json.loads(out.stdout)["outcomes"]}
        assert outcomes == {"a": "upgraded", "b": "started"}
        assert pool.model("a")["version"] == "2" and pool.model("a")["operation"] is None
        pool.wait_serving()
        with Client(pool.frontend) as c:
            x = mlp_input(2)
            r = c.infer("a", x)
            assert r.version == "2"
            np.testing.assert_allclose(r.outputs[0], mlp_reference(2, x), rtol=1e-5, atol=1e-6)
            assert c.infer("b", x).version == "1"
    finally:
        pool.stop()


def _pool_section(path: str) -> dict[str, object]:
    import tomllib

    with open(path, "rb") as f:
        return dict(tomllib.load(f)["pool"])


def test_pool_ctl_never_hangs_when_poold_is_down(tmp_path: object) -> None:
    base = [sys.executable, "-m", "pool.ctl.cli"]
    missing = subprocess.run(
        base + ["--control", f"ipc://{tmp_path}/none.sock", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 3 and "no poold" in missing.stderr
    # A socket file nobody answers on: the connect timeout applies.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(f"{tmp_path}/silent.sock")
    silent.listen(1)
    try:
        out = subprocess.run(
            base
            + ["--control", f"ipc://{tmp_path}/silent.sock", "--connect-timeout", "1", "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 3 and "did not answer" in out.stderr
    finally:
        silent.close()
    usage = subprocess.run(base + ["upgrade"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2
    helptext = subprocess.run(base + ["--help"], capture_output=True, text=True, timeout=30)
    assert helptext.returncode == 0 and "examples:" in helptext.stdout
