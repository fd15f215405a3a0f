"""The metrics endpoint follows the frontend's bind rule (issue 17): a non-loopback
``metrics`` address is refused at config check unless a bearer token file or
``metrics_insecure = true`` says so; with a token, /metrics answers 401 without it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from modelkit import make_mlp
from poolkit import running_pool, write_config

from pool.config import ConfigError, load_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def config_with(tmp: Path, **pool: object) -> str:
    model = tmp / "models" / "m.pt"
    model.parent.mkdir(exist_ok=True)
    model.write_bytes(b"not loaded")  # refused (or checked) before anything is loaded
    base = {
        "frontend": f"ipc://{tmp}/front.sock",
        "control": f"ipc://{tmp}/ctl.sock",
        "state_dir": str(tmp / "state"),
    }
    return write_config(
        str(tmp / "pool.toml"), {**base, **pool}, [{"name": "m", "path": str(model)}]
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.7", "gpu-host.example"])
def test_non_loopback_metrics_without_token_or_override_is_refused(
    tmp_path: Path, host: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(config_with(tmp_path, metrics=f"{host}:9400"), env={})
    (problem,) = [p for p in e.value.problems if p.startswith("pool.metrics:")]
    assert "refusing to serve metrics on a non-loopback address without a token" in problem
    assert "metrics_token_file" in problem and "metrics_insecure" in problem


def test_loopback_token_or_explicit_override_is_accepted(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    for pool in (
        {"metrics": "127.0.0.1:9400"},
        {"metrics": "[::1]:9400"},
        {"metrics": "0.0.0.0:9400", "metrics_insecure": True},
        {"metrics": "0.0.0.0:9400", "metrics_token_file": str(token)},
    ):
        assert load_config(config_with(tmp_path, **pool), env={}).pool.metrics == pool["metrics"]
    with pytest.raises(ConfigError, match="pool.metrics_token_file: no such file"):
        load_config(config_with(tmp_path, metrics="0.0.0.0:1", metrics_token_file="/no"), env={})


@pytest.mark.slow
def test_poold_refuses_a_public_metrics_bind(tmp_path: Path) -> None:
    config = config_with(tmp_path, metrics=f"0.0.0.0:{free_port()}")
    done = subprocess.run(
        [sys.executable, "-m", "pool.poold", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPU_POOL_")},
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "pool.metrics: refusing to serve metrics on a non-loopback address" in done.stderr
    assert not (tmp_path / "state").exists(), "poold must refuse before touching anything"


def get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


@pytest.mark.slow
def test_public_metrics_with_a_token_answer_only_the_token(tmp_path: Path) -> None:
    token = tmp_path / "metrics.token"
    token.write_text("tok-12345\n")
    path = make_mlp(str(tmp_path / "models" / "mlp.pt"), seed=1)
    port = free_port()
    models = [{"name": "mlp", "path": path, "devices": ["cpu"]}]
    with running_pool(
        str(tmp_path), models, metrics=f"0.0.0.0:{port}", metrics_token_file=str(token)
    ):
        url = f"http://127.0.0.1:{port}"
        status, body = get(f"{url}/metrics")
        assert status == 401 and "Bearer" in body
        assert get(f"{url}/metrics", "wrong")[0] == 401
        assert get(f"{url}/metrics", "tok-1234")[0] == 401  # a prefix is not the token
        status, body = get(f"{url}/metrics", "tok-12345")
        assert status == 200 and "gpupool_" in body
        assert get(f"{url}/healthz") == (200, "ok\n")  # probes send no credentials


@pytest.mark.slow
def test_reload_rereads_the_metrics_token(tmp_path: Path) -> None:
    """A leaked token is revoked as CURVE keys are: write a new one, pool-ctl reload."""
    token = tmp_path / "metrics.token"
    token.write_text("old-token\n")
    path = make_mlp(str(tmp_path / "models" / "mlp.pt"), seed=1)
    port = free_port()
    models = [{"name": "mlp", "path": path, "devices": ["cpu"]}]
    with running_pool(
        str(tmp_path), models, metrics=f"127.0.0.1:{port}", metrics_token_file=str(token)
    ) as pool:
        url = f"http://127.0.0.1:{port}/metrics"
        assert get(url, "old-token")[0] == 200
        token.write_text("new-token\n")
        assert get(url, "old-token")[0] == 200  # nothing changes before the reload
        done = pool.pool_ctl("reload")
        assert done.returncode == 0, done.stdout + done.stderr
        assert get(url, "old-token")[0] == 401
        assert get(url, "new-token")[0] == 200
        token.write_text("")  # a file that holds no token: the reload fails, the token stays
        done = pool.pool_ctl("reload")
        assert done.returncode == 1 and "old token kept" in done.stdout, done.stdout
        assert get(url, "new-token")[0] == 200
