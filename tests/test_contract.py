"""The model contract against a real poold: the two-input model that could not be
upgraded, ``describe``, and the checks an upgrade makes before it switches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from modelkit import (
    make_embedding,
    make_factory_model,
    make_mlp,
    make_one_row,
    make_pair,
    make_raising_bare,
    mlp_answer_problem,
    mlp_input,
    mlp_reference,
    pair_reference,
)
from poolkit import Load, Pool, running_pool, start_pool, wait_for

from router.client import Client


def pair_inputs(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    return (
        rng.random((1, 3, 16, 16), dtype=np.float32),
        rng.random((1, 3, 16, 16), dtype=np.float32),
    )


def describe(pool: Pool, model: str) -> dict:
    out = pool.pool_ctl("describe", model, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_two_input_tuple_model_upgrades_and_rolls_back_after_traffic(tmp_path: object) -> None:
    """The issue's first report: forward(x1, x2) -> (y1, y2), no manifest, one request
    served, then an upgrade to a second file and a rollback: both must commit."""
    d = str(tmp_path)
    v1 = make_pair(os.path.join(d, "models", "v1.pt"), seed=1)
    v2 = make_pair(os.path.join(d, "models", "v2.pt"), seed=2)
    models = [{"name": "pair", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        client = Client(pool.frontend)
        x1, x2 = pair_inputs(0)
        r = client.infer("pair", x1, x2, timeout=30)
        for got, want in zip(r.outputs, pair_reference(1, x1, x2), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        # The serving version's contract is learned from that request.
        info = wait_for(
            lambda: (lambda m: m if m["contract_known"] else None)(describe(pool, "pair")),
            20,
            "the contract learned from the first request",
        )
        assert [(t["name"], t["dtype"], t["shape"], t["batch_dim"]) for t in info["inputs"]] == [
            ("x1", "float32", [-1, 3, 16, 16], 0),
            ("x2", "float32", [-1, 3, 16, 16], 0),
        ]
        assert [t["name"] for t in info["outputs"]] == ["output0", "output1"]
        assert info["batching"]["batchable"] is True and info["devices"] == ["cpu"]

        up = pool.pool_ctl("upgrade", "pair", v2, "--version", "2", "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        res = json.loads(up.stdout)
        assert res["outcome"] == "committed" and res["worker_timings"]["warm_s"] > 0
        r = client.infer("pair", x1, x2, timeout=30)
        assert r.version == "2"
        for got, want in zip(r.outputs, pair_reference(2, x1, x2), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)

        back = pool.pool_ctl("rollback", "pair", "--json")
        assert back.returncode == 0, back.stdout + back.stderr
        assert json.loads(back.stdout)["to_version"] == "1"
        assert client.infer("pair", x1, x2, timeout=30).version == "1"
        info = describe(pool, "pair")
        assert info["version"] == "1"
        assert [v["version"] for v in info["versions"]] == ["1", "2"]
        assert all(len(v["inputs"]) == 2 for v in info["versions"])
        client.close()


def mlp_check(x: np.ndarray, r: object) -> str | None:
    return mlp_answer_problem({"1": 1}, x, r)


REFUSED = {
    # name: (builder, words the reason must contain)
    "int64 input (manifest)": (
        lambda d: make_embedding(os.path.join(d, "emb", "model.pt"), seed=1),
        "input 0 (input): dtype int64 in the new version, float32 serving",
    ),
    "int64 input (no manifest)": (
        lambda d: make_embedding(os.path.join(d, "emb2", "model.pt"), seed=1, manifest=False),
        "warm-up input set 0 (float32[1, 16]) failed: "
        "RuntimeError: Expected tensor for argument #1 'indices'",
    ),
    "output shape": (
        lambda d: make_mlp(os.path.join(d, "wide", "model.pt"), 2, out_features=8, manifest=False),
        "output 0 (output0): dimension 1 is 8 in the new version, 4 serving",
    ),
    "one row whatever the batch": (
        lambda d: make_one_row(os.path.join(d, "onerow", "model.pt")),
        "output 0 (output0): does not follow the batch in the new version",
    ),
}


@pytest.mark.slow
def test_contract_breaks_are_refused_then_allowed_on_purpose(tmp_path: object) -> None:
    d = str(tmp_path)
    v1 = make_mlp(os.path.join(d, "models", "v1.pt"), seed=1)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        info = describe(pool, "m")
        assert info["contract_known"] and info["contract_source"] == "manifest"
        assert info["inputs"] == [
            {"name": "input", "dtype": "float32", "shape": [-1, 16], "batch_dim": 0}
        ]
        assert info["outputs"] == [
            {"name": "output0", "dtype": "float32", "shape": [-1, 4], "batch_dim": 0}
        ]
        models_dir = os.path.join(d, "models")
        with Load(pool.frontend, "m", 4, check=mlp_check) as load:
            load.wait_ok(20)
            for strategy in ("surge", "drain-first"):
                for case, (make, words) in REFUSED.items():
                    path = make(models_dir)
                    out = pool.pool_ctl("upgrade", "m", path, "--strategy", strategy, "--json")
                    assert out.returncode == 1, (case, out.stdout + out.stderr)
                    res = json.loads(out.stdout)
                    assert res["outcome"] == "rolled_back" and words in res["reason"], (case, res)
                    load.wait_ok(5)
        load.stop()
        assert not load.errors, load.errors[:3]
        history = pool.ctl("history", {"model": "m"})["data"]["history"]
        assert [h["outcome"] for h in history[1:]] == ["rolled_back"] * 2 * len(REFUSED)
        assert pool.model("m")["version"] == "1"

        # Labels: a documented character set, and one label names one file.
        wide = REFUSED["output shape"][0](models_dir)
        bad = pool.pool_ctl("upgrade", "m", wide, "--version", "a b/c")
        assert bad.returncode == 2 and "not allowed" in bad.stderr, bad.stderr
        raw = pool.ctl("upgrade", {"model": "m", "path": wide, "version": "a b/c"})
        assert not raw["ok"] and "not allowed" in raw["error"]
        reuse = pool.pool_ctl(
            "upgrade", "m", wide, "--version", "1", "--allow-contract-change", "--json"
        )
        assert reuse.returncode == 1
        assert "already names another file" in json.loads(reuse.stdout)["reason"]

        # On purpose: the same change goes through, and says what changed.
        out = pool.pool_ctl(
            "upgrade", "m", wide, "--version", "wide", "--allow-contract-change", "--json"
        )
        assert out.returncode == 0, out.stdout
        assert "dimension 1 is 8" in json.loads(out.stdout)["contract"]
        assert describe(pool, "m")["outputs"][0]["shape"] == [-1, 8]


@pytest.mark.slow
def test_after_a_restart_warm_up_comes_from_the_recorded_contract(tmp_path: object) -> None:
    """No manifest: the contract is learned from traffic and recorded; after a restart,
    before any request, a version whose forward raises is refused at warm-up."""
    d = str(tmp_path)
    v1 = make_mlp(os.path.join(d, "models", "v1.pt"), seed=1, manifest=False)
    bad = make_raising_bare(os.path.join(d, "models", "bad", "model.pt"))
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        assert not describe(pool, "m")["contract_known"]
        with pool.client() as client:
            client.infer("m", np.ones((2, 16), np.float32), timeout=30)
        wait_for(lambda: describe(pool, "m")["contract_known"], 20, "contract from traffic")
        assert describe(pool, "m")["contract_source"] == "traffic"
    pool = start_pool(d, models)
    try:
        info = describe(pool, "m")
        assert info["contract_known"] and info["inputs"][0]["shape"] == [-1, 16]
        out = pool.pool_ctl("upgrade", "m", bad, "--json")
        assert out.returncode == 1, out.stdout
        res = json.loads(out.stdout)
        assert "warmup:" in res["reason"] and "fails on every call" in res["reason"], res
        assert pool.model("m")["version"] == "1"
    finally:
        pool.stop()


@pytest.mark.slow
def test_watch_window_rolls_back_a_version_that_fails_real_traffic(tmp_path: object) -> None:
    """The new version passes warm-up and golden checks (non-negative inputs) but raises
    on the negative inputs clients send: the watch window switches back by itself."""
    d = str(tmp_path)
    v1 = make_mlp(os.path.join(d, "models", "v1.pt"), seed=1)
    bad = make_factory_model(os.path.join(d, "models", "bad"), seed=2, forward="raise_if_negative")
    good = make_mlp(os.path.join(d, "models", "v2.pt"), seed=2)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu", "cpu"]}]
    opts = {"watch_requests": 40, "watch_s": 20.0}
    with running_pool(d, models, **opts) as pool:

        def negative(i: int) -> np.ndarray:
            return -mlp_input(1, seed=i)

        def check(x: np.ndarray, r: object) -> str | None:
            want = {"1": 1, "2": 2}.get(getattr(r, "version", ""))
            if want is None or not np.allclose(r.outputs[0], mlp_reference(want, x), atol=1e-5):  # type: ignore[attr-defined]
                return f"wrong answer from version {getattr(r, 'version', '')!r}"
            return None

        with Load(
            pool.frontend,
            "m",
            4,
            check=check,
            make_input=negative,
            allowed=frozenset({"MODEL_ERROR"}),
        ) as load:
            load.wait_ok(20)
            for strategy in ("surge", "drain-first"):
                out = pool.pool_ctl("upgrade", "m", bad, "--strategy", strategy, "--json")
                assert out.returncode == 1, out.stdout
                res = json.loads(out.stdout)
                assert res["reason"].startswith("watch: "), res
                assert "failed (MODEL_ERROR)" in res["reason"]
                load.wait_ok(20)
                assert pool.model("m")["version"] == "1"
            out = pool.pool_ctl("upgrade", "m", good, "--version", "2", "--json")
            assert out.returncode == 0, out.stdout
            assert "answered, 0 MODEL_ERROR" in json.loads(out.stdout)["watch"]
            load.wait_ok(20)
        load.stop()
        assert not load.errors, load.errors[:3]
        assert load.allowed_errors.get("MODEL_ERROR", 0) >= 10  # the canary's cost, bounded
        history = pool.ctl("history", {"model": "m"})["data"]["history"]
        assert [h["outcome"] for h in history[-3:]] == ["rolled_back", "rolled_back", "committed"]


@pytest.mark.slow
def test_internal_worker_error_reaches_the_log_with_its_traceback(tmp_path: object) -> None:
    """A worker that fails outside load/warm-up/validation (here: CUDA asked of a CPU-only
    torch) sends its cause and traceback: poold logs both, and the reason names the cause
    instead of only "exit 71"."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    d = str(tmp_path)
    v1 = make_mlp(os.path.join(d, "models", "v1.pt"), seed=1)
    models = [{"name": "g", "path": v1, "devices": ["cuda:0"], "standby": False}]
    with running_pool(d, models, wait=False) as pool:
        wait_for(lambda: "first seen: internal: " in pool.log(), 60, "the failure logged")
        log = pool.log()
        assert "internal error: " in log and "Traceback (most recent call last)" in log
        assert "Torch not compiled with CUDA enabled" in log or "CUDA" in log
        assert "exit 71 (internal worker error) (first seen: internal: " in log
