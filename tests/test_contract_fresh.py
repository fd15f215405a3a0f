"""The contract of a model nothing has told poold about yet: no manifest, no request.

The article's model (TorchScript ``forward(x1, x2) -> (y1, y2)``, float32
``[1, 3, 16, 16]``): with ``example_inputs`` in its file the contract is probed at load
time; without them ``describe`` and the upgrade say "not checked (no example inputs)";
once it has served, the contract learned is recorded and holds after a restart. A
failing worker's own words reach the upgrade's result and the history."""

from __future__ import annotations

import json
import os
from datetime import datetime

import numpy as np
import pytest
from contractkit import make_internal_error, make_pair_float64, make_pair_raising
from modelkit import make_corrupt, make_mlp, make_pair, pair_reference
from poolkit import Pool, running_pool, start_pool, wait_for

from router.client import Client

PAIR = [("x1", "float32", [-1, 3, 16, 16], 0), ("x2", "float32", [-1, 3, 16, 16], 0)]


def describe(pool: Pool, model: str) -> dict:
    out = pool.pool_ctl("describe", model, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def inputs_of(info: dict) -> list[tuple]:
    return [(t["name"], t["dtype"], t["shape"], t["batch_dim"]) for t in info["inputs"]]


def pair_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return tuple(rng.random((1, 3, 16, 16), dtype=np.float32) for _ in range(2))  # type: ignore[return-value]


def assert_serves_v1(pool: Pool) -> None:
    x1, x2 = pair_inputs()
    with pool.client() as client:
        r = client.infer("pair", x1, x2, timeout=30)
    assert r.version == "1"
    for got, want in zip(r.outputs, pair_reference(1, x1, x2), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def refused(pool: Pool, path: str, words: str) -> dict:
    out = pool.pool_ctl("upgrade", "pair", path, "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    res = json.loads(out.stdout)
    assert res["outcome"] == "rolled_back" and words in res["reason"], res
    assert pool.model("pair")["version"] == "1"
    return res


def upgrade_breaks(pool: Pool, d: str) -> None:
    """A forward that raises, then an output that turns float64: both refused before
    the switch, the reason in the result, version 1 serving."""
    res = refused(
        pool, make_pair_raising(os.path.join(d, "models", "raise.pt")), "fails on every call"
    )
    assert res["reason"].startswith("warmup: ") or ": warmup: " in res["reason"], res
    refused(
        pool,
        make_pair_float64(os.path.join(d, "models", "f64.pt")),
        "output 0 (output0): dtype float64 in the new version, float32 serving",
    )
    assert_serves_v1(pool)


@pytest.mark.slow
def test_example_inputs_give_a_fresh_model_its_contract_before_any_request(
    tmp_path: object,
) -> None:
    d = str(tmp_path)
    v1 = make_pair(os.path.join(d, "models", "v1.pt"), seed=1, examples=True)
    models = [{"name": "pair", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        info = describe(pool, "pair")
        assert info["contract_known"] and info["contract_source"] == "example_inputs", info
        assert inputs_of(info) == PAIR and len(info["outputs"]) == 2
        assert info["batching"]["batchable"] is True
        assert info["schema"] == "forward(x1: Tensor, x2: Tensor) -> Tuple[Tensor, Tensor]"
    pool = start_pool(d, models)  # a restart, and still nothing served
    try:
        assert inputs_of(describe(pool, "pair")) == PAIR
        upgrade_breaks(pool, d)
    finally:
        pool.stop()


@pytest.mark.slow
def test_without_examples_or_traffic_describe_and_upgrade_say_not_checked(
    tmp_path: object,
) -> None:
    d = str(tmp_path)
    v1 = make_pair(os.path.join(d, "models", "v1.pt"), seed=1)
    v2 = make_pair(os.path.join(d, "models", "v2.pt"), seed=2)
    models = [{"name": "pair", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        info = describe(pool, "pair")
        assert not info["contract_known"] and info["inputs"] == []
        assert info["contract_note"].startswith("not checked (no example inputs)"), info
        assert info["schema"] == "forward(x1: Tensor, x2: Tensor) -> Tuple[Tensor, Tensor]"
        text = pool.pool_ctl("describe", "pair").stdout
        assert "contract: not checked (no example inputs)" in text, text
        assert "schema: forward(x1: Tensor, x2: Tensor)" in text, text

        out = pool.pool_ctl("upgrade", "pair", v2, "--version", "2")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "contract not checked (no example inputs)" in out.stdout, out.stdout
        entry = pool.ctl("history", {"model": "pair"})["data"]["history"][-1]
        assert entry["outcome"] == "committed"
        assert entry["contract"].startswith("not checked (no example inputs)"), entry


@pytest.mark.slow
def test_the_contract_learned_from_traffic_holds_after_a_restart(tmp_path: object) -> None:
    """The article's model exactly: no manifest, no examples; one request, a restart,
    nothing served since: a raising forward and a float64 output are refused."""
    d = str(tmp_path)
    v1 = make_pair(os.path.join(d, "models", "v1.pt"), seed=1)
    models = [{"name": "pair", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        assert_serves_v1(pool)
        wait_for(lambda: describe(pool, "pair")["contract_known"], 20, "contract from traffic")
    pool = start_pool(d, models)
    try:
        info = describe(pool, "pair")
        assert info["contract_known"] and inputs_of(info) == PAIR, info
        upgrade_breaks(pool, d)
        history = pool.ctl("history", {"model": "pair"})["data"]["history"]
        assert [h["outcome"] for h in history[-2:]] == ["rolled_back", "rolled_back"]
        assert "fails on every call" in history[-2]["reason"]
    finally:
        pool.stop()


def history_entry(pool: Pool, model: str) -> dict:
    out = pool.pool_ctl("history", model, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    entry = json.loads(out.stdout)["history"][-1]
    datetime.fromisoformat(entry["at"])  # timestamped, not a bare stderr line
    return entry


@pytest.mark.slow
def test_a_failing_workers_cause_reaches_the_result_and_the_history(tmp_path: object) -> None:
    d = str(tmp_path)
    v1 = make_mlp(os.path.join(d, "models", "v1.pt"), seed=1)
    corrupt = make_corrupt(os.path.join(d, "models", "bad.pt"))
    broken = make_internal_error(os.path.join(d, "models", "broken"), seed=2)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, models) as pool:
        cases = [
            (corrupt, "load: ModelLoadError: ", "cannot load as TorchScript"),
            (broken, "internal: RuntimeError: ", "contractkit: the worker broke after warm-up"),
        ]
        for path, stage, words in cases:
            out = pool.pool_ctl("upgrade", "m", path, "--json")
            assert out.returncode == 1, out.stdout + out.stderr
            reason = json.loads(out.stdout)["reason"]
            assert stage in reason and words in reason and "exit 7" not in reason, reason
            entry = history_entry(pool, "m")
            assert entry["outcome"] == "rolled_back" and entry["reason"] == reason, entry
            assert stage in pool.pool_ctl("history", "m").stdout
        with Client(pool.frontend) as client:
            assert client.infer("m", np.ones((1, 16), np.float32), timeout=30).version == "1"
