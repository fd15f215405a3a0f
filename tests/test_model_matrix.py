"""Every model shape a user brings, served under concurrent load by one poold, checked
against the same file run locally request by request, and upgraded (surge before any
traffic, drain-first under load), rolled back and described (issue 15)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from matrixkit import CASES, Case, reference
from poolkit import Pool, running_pool, wait_for

from router.client import Client
from router.errors import PoolError

CLIENTS_PER_MODEL = 2


class MatrixLoad:
    """Clients per model, each answer compared with the unbatched local reference of the
    version that says it computed it."""

    def __init__(self, pool: Pool, cases: list[Case], refs: dict[str, dict[str, Any]]) -> None:
        self.pool, self.cases, self.refs = pool, cases, refs
        self.stop_flag = threading.Event()
        self.ok: dict[str, int] = {c.name: 0 for c in cases}
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.run, args=(c, i), daemon=True)
            for c in cases
            for i in range(CLIENTS_PER_MODEL)
        ]

    def run(self, case: Case, idx: int) -> None:
        rng = np.random.default_rng(idx)
        with Client(self.pool.frontend, retries=1, timeout=60) as client:
            while not self.stop_flag.is_set():
                inputs = case.inputs(rng)
                try:
                    r = client.infer(case.name, *inputs)
                except PoolError as exc:
                    with self.lock:
                        self.errors.append(f"{case.name}: {exc}")
                    continue
                problem = self.check(case, inputs, r)
                with self.lock:
                    if problem:
                        self.errors.append(problem)
                    else:
                        self.ok[case.name] += 1

    def check(self, case: Case, inputs: list[object], r: Any) -> str | None:
        module = self.refs[case.name].get(r.version)
        if module is None:
            return f"{case.name}: unexpected version {r.version!r}"
        want = reference(module, inputs)
        if len(want) != len(r.outputs):
            return f"{case.name}: {len(r.outputs)} outputs, expected {len(want)}"
        for k, (got, exp) in enumerate(zip(r.outputs, want, strict=True)):
            if got.shape != exp.shape or not np.allclose(got, exp, atol=case.atol, rtol=1e-3):
                return f"{case.name} v{r.version} output {k}: {got.shape} vs {exp.shape}"
        return None

    def wait_each(self, n: int, timeout: float = 120.0) -> None:
        start = dict(self.ok)
        wait_for(
            lambda: all(self.ok[c] >= start[c] + n for c in start), timeout, f"{n} answers each"
        )

    def __enter__(self) -> MatrixLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)


def upgrade(pool: Pool, name: str, path: str, version: str, strategy: str) -> dict[str, Any]:
    res = pool.ctl(
        "upgrade",
        {"model": name, "path": path, "version": version, "strategy": strategy},
        timeout_s=180,
    )
    assert res["ok"], (name, strategy, res)
    return res["data"]


@pytest.mark.slow
def test_model_matrix_serves_upgrades_rolls_back_and_describes(tmp_path: object) -> None:
    run_matrix(str(tmp_path), "cpu", cuda_graphs=False)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_model_matrix_on_cuda(tmp_path: object, cuda_graphs: bool) -> None:
    run_matrix(str(tmp_path), "cuda:0", cuda_graphs=cuda_graphs)


def run_matrix(d: str, device: str, cuda_graphs: bool) -> None:
    paths = {c.name: {s: c.build(d, s) for s in (1, 2)} for c in CASES}
    refs = {
        c.name: {str(s): torch.jit.load(paths[c.name][s]).eval() for s in (1, 2)} for c in CASES
    }
    models = [
        {
            "name": c.name,
            "path": paths[c.name][1],
            "version": "1",
            "devices": [device],
            "max_batch": 8,
            "max_delay_ms": 2,
            "threads": 1,
            "cuda_graphs": cuda_graphs,
        }
        for c in CASES
    ]
    with running_pool(d, models, heartbeat_interval_s=0.3) as pool:
        # Before any traffic: surge to version 2 (a model without a manifest has no
        # contract yet; one with a manifest is checked against its own).
        with ThreadPoolExecutor(len(CASES)) as ex:
            list(ex.map(lambda c: upgrade(pool, c.name, paths[c.name][2], "2", "surge"), CASES))
        with MatrixLoad(pool, CASES, refs) as load:
            load.wait_each(10)

            # Contracts are known now for every case (learned from traffic if need be).
            def known(c: Case) -> dict[str, Any] | None:
                info = pool.ctl("describe", {"model": c.name})["data"]
                return info if info["contract_known"] else None

            for c in CASES:
                wait_for(lambda c=c: known(c), 30, f"{c.name} contract")

            def ops(c: Case) -> None:
                upgrade(pool, c.name, paths[c.name][1], "1", "drain-first")
                load.wait_each(3)
                upgrade(pool, c.name, paths[c.name][2], "2", "surge")
                res = pool.ctl(
                    "rollback", {"model": c.name, "strategy": "drain-first"}, timeout_s=180
                )
                assert res["ok"] and res["data"]["to_version"] == "1", (c.name, res)

            with ThreadPoolExecutor(len(CASES)) as ex:
                list(ex.map(ops, CASES))
            load.wait_each(5)
        assert not load.errors, load.errors[:5]
        infos = {c.name: pool.ctl("describe", {"model": c.name})["data"] for c in CASES}
        for c in CASES:
            info = infos[c.name]
            assert [t["name"] for t in info["inputs"]] == list(c.input_names), info
            assert info["batching"]["batchable"] is c.batchable, (c.name, info["batching"])
            assert pool.model(c.name)["version"] == "1"
            history = pool.ctl("history", {"model": c.name})["data"]["history"]
            assert all(h["outcome"] == "committed" for h in history), (c.name, history)
        seq = infos["seq"]["inputs"][0]
        assert seq["shape"] == [-1, -1, 4] and seq["batch_dim"] == 0, seq
        assert (
            infos["scalar"]["outputs"][0]["shape"] == []
            and infos["embed"]["inputs"][0]["dtype"] == "int64"
        )
        assert infos["half"]["outputs"][0]["dtype"] == "float16"
        assert infos["bf16"]["inputs"][0]["dtype"] == "bfloat16"
