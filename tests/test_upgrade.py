"""Hot update and rollback under load, on the CPU, against a real poold."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import psutil
import pytest
from modelkit import (
    make_corrupt,
    make_factory_model,
    make_golden_mismatch,
    make_mlp,
    make_raising_forward,
    mlp_answer_problem,
)
from poolkit import Load, Pool, running_pool, start_pool, wait_for

# Every test here starts a real pool: the full suite, not the fast tier.
pytestmark = pytest.mark.slow

SEEDS = {"1": 1, "2": 2}


def check_answer(x: np.ndarray, r: object) -> str | None:
    return mlp_answer_problem(SEEDS, x, r)


def make_versions(d: str) -> tuple[str, str]:
    # Side by side: upgrades may load only from the configured model's directory tree.
    return (
        make_mlp(os.path.join(d, "models", "v1.pt"), seed=1),
        make_mlp(os.path.join(d, "models", "v2.pt"), seed=2),
    )


def gone(pids: list[int]) -> bool:
    """Every pid exited and was reaped (a zombie still 'exists' until reaped)."""
    return not any(psutil.pid_exists(p) for p in pids)


def check_order(load: Load, windows: list[tuple[list[int], str, str]]) -> None:
    """From one operation's start to the next one's, each client's answers come from the
    old version, then from the new one, never back: old* new*."""
    for n, (marks, old, new) in enumerate(windows):
        ends = windows[n + 1][0] if n + 1 < len(windows) else [len(v) for v in load.versions]
        for client, versions in enumerate(load.versions):
            seen = versions[marks[client] : ends[client]]
            switch = seen.index(new) if new in seen else len(seen)
            assert set(seen[:switch]) <= {old} and set(seen[switch:]) <= {new}, (old, new, seen)


@pytest.mark.parametrize("strategy", ["surge", "drain-first"])
def test_twenty_upgrades_and_five_rollbacks_lose_nothing(tmp_path: object, strategy: str) -> None:
    d = str(tmp_path)
    v1, v2 = make_versions(d)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu", "cpu"]}]
    with running_pool(d, models) as pool, Load(pool.frontend, "m", 16, check=check_answer) as load:
        load.wait_ok(50)
        current, stopped = "1", []
        ops = 0
        windows: list[tuple[list[int], str, str]] = []
        for i in range(25):
            marks = [len(v) for v in load.versions]
            if i % 5 == 4:
                res = pool.ctl("rollback", {"model": "m", "strategy": strategy}, timeout_s=120)
            else:
                target = "2" if current == "1" else "1"
                res = pool.ctl(
                    "upgrade",
                    {
                        "model": "m",
                        "path": v2 if target == "2" else v1,
                        "version": target,
                        "strategy": strategy,
                    },
                    timeout_s=120,
                )
            assert res["ok"], res
            data = res["data"]
            assert data["outcome"] == "committed" and data["strategy"] == strategy
            assert len(data["pids_started"]) == 2 and len(data["pids_stopped"]) == 2
            windows.append((marks, current, data["to_version"]))
            current = data["to_version"]
            stopped += data["pids_stopped"]
            ops += 1
            load.wait_ok(20)
        load.stop()
        assert ops == 25
        assert not load.errors, load.errors[:5]
        assert load.ok > 500
        check_order(load, windows)
        wait_for(lambda: gone(stopped), 10, "every retired worker reaped")
        status = pool.model("m")
        assert status["version"] == current and len(status["workers"]) == 2
        history = pool.ctl("history", {"model": "m"})["data"]["history"]
        assert sum(h["action"] == "rollback" for h in history) == 5
        assert all(h["outcome"] == "committed" for h in history)


def test_version_order_per_client_during_one_upgrade(tmp_path: object) -> None:
    d = str(tmp_path)
    v1, v2 = make_versions(d)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu", "cpu"]}]
    with running_pool(d, models) as pool, Load(pool.frontend, "m", 8, check=check_answer) as load:
        load.wait_ok(100)
        res = pool.ctl(
            "upgrade",
            {"model": "m", "path": v2, "version": "2", "strategy": "drain-first"},
            timeout_s=60,
        )
        assert res["ok"], res
        # Workers start with the torch import frozen by the spawner (workers.heap).
        assert all(w["heap_frozen"] > 10_000 for w in pool.model("m")["workers"])
        load.wait_ok(100)
        load.stop()
        assert not load.errors
        for versions in load.versions:
            first_new = versions.index("2")
            assert "1" not in versions[first_new:], versions
            assert set(versions) == {"1", "2"}


ROLLBACK_CASES = {
    "corrupt file": (lambda d: make_corrupt(os.path.join(d, "bad", "model.pt")), "load"),
    "forward raises in warm-up": (
        lambda d: make_raising_forward(os.path.join(d, "bad", "model.pt")),
        "warmup",
    ),
    "golden outputs differ": (
        lambda d: make_golden_mismatch(os.path.join(d, "bad", "model.pt"), seed=3),
        "validate",
    ),
}


@pytest.fixture(scope="module")
def steady_pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    d = str(tmp_path_factory.mktemp("rollbacks"))
    v1, _ = make_versions(d)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu", "cpu"]}]
    with running_pool(d, models) as pool:
        yield pool


@pytest.mark.parametrize("case", sorted(ROLLBACK_CASES))
def test_failed_upgrade_rolls_back(steady_pool: Pool, case: str) -> None:
    pool = steady_pool
    make, stage = ROLLBACK_CASES[case]
    bad_dir = os.path.join(pool.dir, "models", case.replace(" ", "-"))
    path = make(bad_dir)
    before = pool.model("m")
    with Load(pool.frontend, "m", 8, check=check_answer) as load:
        load.wait_ok(20)
        out = pool.pool_ctl("upgrade", "m", path, "--version", "bad", "--strategy", "surge")
        load.wait_ok(20)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "not applied" in out.stdout and f"{stage}:" in out.stdout, out.stdout
    assert "still serving version 1" in out.stdout
    assert not load.errors, load.errors[:3]
    after = pool.model("m")
    assert after["version"] == "1" and after["status"] == "serving"
    assert {w["pid"] for w in after["workers"]} == {w["pid"] for w in before["workers"]}
    history = pool.ctl("history", {"model": "m"})["data"]["history"]
    assert history[-1]["outcome"] == "rolled_back" and history[-1]["version"] == "bad"


def test_drain_first_failure_restores_old_version(steady_pool: Pool) -> None:
    pool = steady_pool
    path = make_raising_forward(os.path.join(pool.dir, "models", "raising2", "model.pt"))
    with Load(pool.frontend, "m", 8, check=check_answer) as load:
        load.wait_ok(20)
        res = pool.ctl(
            "upgrade", {"model": "m", "path": path, "strategy": "drain-first"}, timeout_s=60
        )
        load.wait_ok(20)
    assert not res["ok"] and res["data"]["outcome"] == "rolled_back"
    assert not load.errors, load.errors[:3]
    m = pool.model("m")
    assert m["version"] == "1" and len(m["workers"]) == 2
    assert all(w["state"] == "ready" and w["version"] == "1" for w in m["workers"])


def test_load_that_hangs_past_the_deadline(steady_pool: Pool) -> None:
    pool = steady_pool
    path = make_factory_model(os.path.join(pool.dir, "models", "slow"), seed=1, load_sleep_s=60)
    with Load(pool.frontend, "m", 4, check=check_answer) as load:
        load.wait_ok(10)
        t0 = time.monotonic()
        out = pool.pool_ctl("upgrade", "m", path, "--strategy", "surge", "--timeout", "3")
        took = time.monotonic() - t0
        load.wait_ok(10)
    assert out.returncode == 1 and "timeout" in out.stdout, out.stdout
    assert took < 30
    assert not load.errors
    assert pool.model("m")["version"] == "1"


def test_new_worker_killed_mid_load(steady_pool: Pool) -> None:
    pool = steady_pool
    path = make_factory_model(os.path.join(pool.dir, "models", "killme"), seed=2, load_sleep_s=30)
    result: dict[str, object] = {}
    old_pids = {w["pid"] for w in pool.model("m")["workers"]}
    t = threading.Thread(
        target=lambda: result.update(
            pool.ctl("upgrade", {"model": "m", "path": path, "strategy": "surge"}, timeout_s=60)
        )
    )
    with Load(pool.frontend, "m", 4, check=check_answer) as load:
        t.start()

        def loading_pid() -> int | None:
            for w in pool.model("m")["workers"]:
                if w["pid"] not in old_pids and w["state"] == "loading":
                    return int(w["pid"])
            return None

        pid = wait_for(loading_pid, 30, "the new worker to be loading")
        os.kill(pid, 9)
        t.join(60)
        load.wait_ok(10)
    assert result["ok"] is False
    assert "SIGKILL" in str(result["error"]), result
    assert not load.errors
    assert pool.model("m")["version"] == "1"


def test_second_upgrade_refused_at_once(steady_pool: Pool) -> None:
    pool = steady_pool
    path = make_factory_model(os.path.join(pool.dir, "models", "slow2"), seed=2, load_sleep_s=3)
    t = threading.Thread(
        target=lambda: pool.ctl(
            "upgrade", {"model": "m", "path": path, "strategy": "surge"}, timeout_s=60
        )
    )
    t.start()
    wait_for(lambda: pool.model("m")["operation"] == "upgrade", 10, "the first upgrade")
    t0 = time.monotonic()
    out = pool.pool_ctl("upgrade", "m", path)
    assert time.monotonic() - t0 < 10
    assert out.returncode == 1 and "already running" in out.stdout + out.stderr
    t.join(60)
    wait_for(lambda: pool.model("m")["operation"] is None, 30, "the first upgrade to end")
    res = pool.ctl("rollback", {"model": "m", "to": "1"}, timeout_s=60)
    assert res["ok"], res


def test_restart_resumes_last_committed_version_and_digest_is_kept(tmp_path: object) -> None:
    d = str(tmp_path)
    v1, v2 = make_versions(d)
    models = [{"name": "m", "path": v1, "version": "1", "devices": ["cpu"]}]
    pool = start_pool(d, models)
    try:
        res = pool.ctl("upgrade", {"model": "m", "path": v2, "version": "2"}, timeout_s=60)
        assert res["ok"], res
        digest = res["data"]["digest"]
        assert digest.startswith("sha256:")
    finally:
        assert pool.stop() == 0
    pool = start_pool(d, models)
    try:
        m = pool.model("m")
        assert m["version"] == "2" and m["digest"] == digest
    finally:
        assert pool.stop() == 0
    # The file is replaced on disk later: history keeps what was deployed, and poold
    # refuses to pass the new bytes off as version 2.
    shutil.copy(v1, v2)
    pool = start_pool(d, models)
    try:
        m = pool.model("m")
        assert m["version"] == "1"
        assert "changed on disk" in pool.log()
        out = pool.pool_ctl("history", "m", "--json")
        hist = json.loads(out.stdout)["history"]
        assert [h["version"] for h in hist] == ["1", "2", "1"]
        assert hist[1]["digest"] == digest
    finally:
        pool.stop()


def test_worker_recycling_by_max_requests(tmp_path: object) -> None:
    d = str(tmp_path)
    v1, _ = make_versions(d)
    models = [
        {
            "name": "m",
            "path": v1,
            "version": "1",
            "devices": ["cpu"],
            "max_requests": 100,
            "max_requests_jitter": 0.0,
        }
    ]
    with running_pool(d, models) as pool, Load(pool.frontend, "m", 4, check=check_answer) as load:
        first = pool.model("m")["workers"][0]["pid"]
        wait_for(
            lambda: (
                pool.model("m")["workers"][0]["pid"] != first
                and pool.model("m")["workers"][0]["state"] == "ready"
            ),
            60,
            "a recycled worker",
        )
        load.wait_ok(50)
        load.stop()
        assert not load.errors
        wait_for(lambda: gone([first]), 10, "the recycled worker reaped")
        assert pool.model("m")["version"] == "1"


def test_worker_that_dies_during_an_operation_is_replaced_after_it(steady_pool: Pool) -> None:
    pool = steady_pool
    path = make_factory_model(os.path.join(pool.dir, "models", "slow3"), seed=2, load_sleep_s=60)
    victim = pool.model("m")["workers"][0]["pid"]
    result: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: result.update(
            pool.ctl(
                "upgrade",
                {"model": "m", "path": path, "strategy": "surge", "timeout_s": 4.0},
                timeout_s=60,
            )
        )
    )
    t.start()
    wait_for(lambda: pool.model("m")["operation"] == "upgrade", 10, "the upgrade to start")
    os.kill(victim, 9)
    t.join(60)
    assert result["ok"] is False  # the slow model missed its deadline
    wait_for(
        lambda: (
            sum(w["state"] == "ready" and w["version"] == "1" for w in pool.model("m")["workers"])
            == 2
        ),
        30,
        "the slot refilled",
    )
    assert victim not in {w["pid"] for w in pool.model("m")["workers"]}
