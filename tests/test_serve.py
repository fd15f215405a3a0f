"""The serve path end to end: a real poold, real workers, real sockets, real models."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from modelkit import make_mlp, make_two_input, mlp_input, mlp_reference
from poolkit import Pool, in_threads, running_pool

from router.client import Client
from router.errors import BadRequest, NoSuchModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    d = str(tmp_path_factory.mktemp("serve"))
    mlp = make_mlp(os.path.join(d, "mlp", "v7.pt"), seed=7)
    pair = make_two_input(os.path.join(d, "pair", "v1.pt"))
    models = [
        {"name": "mlp", "path": mlp, "version": "7", "devices": ["cpu", "cpu"], "max_batch": 8},
        {"name": "pair", "path": pair, "version": "1", "devices": ["cpu", "cpu"]},
    ]
    with running_pool(d, models) as p:
        yield p


@pytest.mark.slow
def test_sixteen_clients_every_answer_checked(pool: Pool) -> None:
    """16 concurrent REQ clients x 500 requests over two models, each answer verified."""
    errors: list[str] = []
    counts = [0] * 16

    def client(idx: int) -> None:
        with Client(pool.frontend, retries=1, timeout=30) as c:
            for i in range(500):
                if idx % 2 == 0:
                    x = mlp_input(1 + i % 3, seed=idx * 1000 + i)
                    r = c.infer("mlp", x)
                    ok = r.version == "7" and np.allclose(
                        r.outputs[0], mlp_reference(7, x), rtol=1e-5, atol=1e-6
                    )
                else:
                    a = np.full((2, 4), i, np.float32)
                    b = np.full((2, 4), idx, np.float32)
                    r = c.infer("pair", a, b)
                    ok = (
                        r.version == "1"
                        and len(r.outputs) == 2
                        and np.array_equal(r.outputs[0], a + b)
                        and np.array_equal(r.outputs[1], a * b)
                    )
                if not ok:
                    errors.append(f"client {idx} request {i}: wrong answer {r}")
                    return
                counts[idx] += 1

    in_threads(client, 16, timeout=300)
    assert not errors, errors[:3]
    assert counts == [500] * 16
    served = sum(w["served"] for m in pool.status()["models"] for w in m["workers"])
    assert served >= 16 * 500


@pytest.mark.slow
def test_requests_spread_over_both_workers(pool: Pool) -> None:
    before = {w["pid"]: w["served"] for w in pool.model("mlp")["workers"]}
    threads = []
    for i in range(4):

        def go(i: int = i) -> None:
            with Client(pool.frontend) as c:
                for _ in range(50):
                    c.infer("mlp", mlp_input(1, seed=i))

        threads.append(threading.Thread(target=go))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = {w["pid"]: w["served"] for w in pool.model("mlp")["workers"]}
    assert all(after[pid] > before[pid] for pid in before), (before, after)


def test_errors_carry_stable_codes(pool: Pool) -> None:
    with Client(pool.frontend, retries=1, timeout=10) as c:
        with pytest.raises(NoSuchModel) as e:
            c.infer("nope", np.zeros((1, 16), np.float32))
        assert e.value.code == "NO_SUCH_MODEL" and "mlp" in e.value.message
        with pytest.raises(BadRequest) as bad:
            c.infer("mlp", np.zeros((1, 16), np.float32), np.zeros((1, 16), np.float32))
        assert "takes 1 inputs, got 2" in bad.value.message
        assert bad.value.version == "7"
        # The pool still answers after errors, on the same socket.
        assert c.infer("mlp", mlp_input(1)).version == "7"


def test_torch_tensors_in_numpy_out(pool: Pool) -> None:
    import torch

    x = torch.from_numpy(mlp_input(3, seed=5))
    with Client(pool.frontend) as c:
        r = c.infer("mlp", x, id="abc")
    assert r.id == "abc"
    assert isinstance(r.outputs[0], np.ndarray)
    np.testing.assert_allclose(r.outputs[0], mlp_reference(7, x.numpy()), rtol=1e-5, atol=1e-6)


def test_raw_pyzmq_example_from_protocol_md(pool: Pool) -> None:
    """The example in docs/PROTOCOL.md is this file, verbatim, and it works."""
    example = os.path.join(ROOT, "docs", "examples", "raw_client.py")
    with open(example) as f:
        code = f.read()
    with open(os.path.join(ROOT, "docs", "PROTOCOL.md")) as f:
        assert code.strip() in f.read(), "PROTOCOL.md must embed docs/examples/raw_client.py"
    for package in ("router", "pool", "workers"):
        assert f"import {package}" not in code and f"from {package}" not in code
    out = subprocess.run(
        [sys.executable, example, pool.frontend, "mlp"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )
    assert out.returncode == 0, out.stderr
    assert "version 7" in out.stdout
    assert "NO_SUCH_MODEL" in out.stdout


@pytest.mark.slow
def test_status_shows_every_worker(pool: Pool) -> None:
    result = pool.pool_ctl("status", "--json")
    assert result.returncode == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    names = {m["name"]: m for m in data["models"]}
    assert set(names) == {"mlp", "pair"}
    for m in names.values():
        assert m["status"] == "serving" and m["queue"] == 0
        assert len(m["workers"]) == 2
        for w in m["workers"]:
            assert w["state"] == "ready" and w["pid"] > 0 and w["device"] == "cpu"
            assert {"inflight", "served", "gpu_bytes", "rss_bytes", "lane"} <= w.keys()
    human = pool.pool_ctl("status")
    assert human.returncode == 0 and "mlp" in human.stdout and "ready" in human.stdout


def test_every_worker_has_its_lane(pool: Pool) -> None:
    """Lanes are on by default: each worker connected one and the router took it."""
    deadline = time.monotonic() + 10
    while True:
        lanes = [w["lane"] for m in pool.status()["models"] for w in m["workers"]]
        if all(lanes) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lanes == [True] * 4
