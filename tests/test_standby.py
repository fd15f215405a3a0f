"""Hot standbys on the CPU (``standby = true``): forked ahead, never serving, taken on
crash, upgrade (surge and staged drain-first) and recycle, replenished, replaced when
they die. One poold serves every case in order; the standby is the device's, shared by
the models on it (``cold`` has ``standby = false`` and must never take it)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from modelkit import make_mlp, mlp_answer_problem, mlp_input
from poolkit import Load, Pool, running_pool, wait_for
from standbykit import Kit

from pool.lifecycle import IllegalTransition
from pool.standby import StandbyState

SEEDS = {"1": 1, "2": 2, "3": 3}


def check(x: Any, r: Any) -> str | None:
    return mlp_answer_problem(SEEDS, x, r)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = str(tmp_path_factory.mktemp("standby"))
    models = os.path.join(d, "models")
    for v, seed in SEEDS.items():
        make_mlp(os.path.join(models, f"v{v}.pt"), seed=seed)
    make_mlp(os.path.join(models, "cold.pt"), seed=1)
    make_mlp(os.path.join(models, "recycled.pt"), seed=1)
    cfg = [
        {"name": "m", "path": os.path.join(models, "v1.pt"), "version": "1", "devices": ["cpu"]},
        {"name": "cold", "path": os.path.join(models, "cold.pt"), "version": "1",
         "devices": ["cpu"], "standby": False},
        {"name": "recycled", "path": os.path.join(models, "recycled.pt"), "version": "1",
         "devices": ["cpu"], "max_requests": 40, "max_requests_jitter": 0.0},
    ]  # fmt: skip
    with running_pool(d, cfg, standby=True) as p:
        yield p


def standby(pool: Pool, other_than: int | None = None) -> dict[str, Any]:
    """The cpu standby once it waits (and is not ``other_than``)."""

    def ready() -> dict[str, Any] | None:
        for sb in pool.status()["standby"]["standbys"]:
            if sb["device"] == "cpu" and sb["state"] == "waiting" and sb["pid"] != other_than:
                return sb
        return None

    found: dict[str, Any] = wait_for(ready, 60, "a waiting standby on cpu")
    return found


def workers(pool: Pool, model: str) -> list[dict[str, Any]]:
    return [w for w in pool.model(model)["workers"] if w["state"] == "ready"]


def unix_sockets(pid: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections(kind="unix"))


@pytest.mark.slow
def test_forked_ahead_holds_nothing_and_cannot_serve(pool: Pool) -> None:
    sb = standby(pool)
    serving = {w["pid"] for m in ("m", "cold", "recycled") for w in workers(pool, m)}
    assert sb["pid"] not in serving
    # Its one socket is the socketpair to the spawner: no way to receive a request.
    assert unix_sockets(sb["pid"]) == 1
    assert any(unix_sockets(pid) > 1 for pid in serving)
    with pool.client() as c:
        for i in range(20):
            assert check(mlp_input(1, seed=i), c.infer("m", mlp_input(1, seed=i))) is None
    assert pool.status()["standby"]["standbys"][0]["pid"] == sb["pid"]  # still idle


@pytest.mark.slow
def test_crash_replacement_takes_it_and_a_new_one_follows(pool: Pool) -> None:
    sb = standby(pool)
    (old,) = workers(pool, "m")
    with Load(pool.frontend, "m", 2, check=check) as load:
        load.wait_ok(10)
        os.kill(old["pid"], signal.SIGKILL)
        new = wait_for(lambda: [w for w in workers(pool, "m") if w["pid"] != old["pid"]],
                       60, "a replacement worker")[0]  # fmt: skip
        load.wait_ok(10)
    assert not load.errors, load.errors[:3]
    assert new["pid"] == sb["pid"] and new["from_standby"]
    assert standby(pool, other_than=sb["pid"])["pid"] != sb["pid"]  # replenished


@pytest.mark.slow
def test_model_with_standby_false_never_takes_it(pool: Pool) -> None:
    sb = standby(pool)
    (old,) = workers(pool, "cold")
    os.kill(old["pid"], signal.SIGKILL)
    new = wait_for(lambda: [w for w in workers(pool, "cold") if w["pid"] != old["pid"]],
                   60, "a cold replacement")[0]  # fmt: skip
    assert new["pid"] != sb["pid"] and not new["from_standby"]
    assert standby(pool)["pid"] == sb["pid"]


def upgrade(pool: Pool, version: str, strategy: str) -> dict[str, Any]:
    path = os.path.join(pool.dir, "models", f"v{version}.pt")
    args = {"model": "m", "path": path, "version": version, "strategy": strategy}
    return pool.ctl("upgrade", args, timeout_s=120)


@pytest.mark.slow
def test_upgrade_surge_then_drain_first_staged(pool: Pool) -> None:
    with Load(pool.frontend, "m", 3, check=check) as load:
        load.wait_ok(10)
        sb = standby(pool)
        res = upgrade(pool, "2", "surge")
        assert res["ok"], res
        data = res["data"]
        assert data["standby"] == {"taken": 1, "staged": False}
        assert data["pids_started"] == [sb["pid"]]
        sb = standby(pool, other_than=sb["pid"])
        res = upgrade(pool, "3", "drain-first")
        assert res["ok"], res
        data = res["data"]
        assert data["standby"] == {"taken": 1, "staged": True}
        assert data["pids_started"] == [sb["pid"]]
        assert "staged_s" in data["phases"] and "staged_s" in data["worker_timings"]
        load.wait_ok(10)
    assert not load.errors, load.errors[:3]
    for versions in load.versions:  # never back to an older version
        assert versions == sorted(versions), versions[:50]
    history = pool.ctl("history", {"model": "m"})["data"]["history"]
    assert history[-1]["standby"] == {"taken": 1, "staged": True}
    assert history[-2]["standby"] == {"taken": 1, "staged": False}


@pytest.mark.slow
def test_recycle_takes_it(pool: Pool) -> None:
    sb = standby(pool)
    (old,) = workers(pool, "recycled")
    with pool.client() as c:
        for i in range(60):
            c.infer("recycled", mlp_input(1, seed=i))
    new = wait_for(lambda: [w for w in workers(pool, "recycled") if w["pid"] != old["pid"]],
                   60, "the recycled worker's replacement")[0]  # fmt: skip
    assert new["pid"] == sb["pid"] and new["from_standby"]


@pytest.mark.slow
def test_dead_standby_is_replaced(pool: Pool) -> None:
    sb = standby(pool)
    died = pool.status()["standby"]["died"].get("cpu", 0)
    os.kill(sb["pid"], signal.SIGKILL)
    again = standby(pool, other_than=sb["pid"])
    assert again["pid"] != sb["pid"]
    assert pool.status()["standby"]["died"]["cpu"] == died + 1
    text = pool.pool_ctl("status")
    assert f"standby pid {again['pid']} on cpu" in text.stdout, text.stdout


# ---------------------------------------------------------------- decisions, no processes


def test_standby_decisions() -> None:
    kit = Kit()
    asked, sb = kit.asked, kit.standbys
    sb.want(["cuda:0"])
    sb.tick(0.0, busy_devices={"cuda:0"})
    assert not asked  # nothing forks where something boots
    # A spawn with no standby there forks one and takes it at once, by its token.
    first = sb.take("cuda:0")
    assert first is not None and first.pid is None and first.token == 1 and not first.waited
    sb.on_spawned(1, 4141)
    sb.took(4141, used=True)
    assert 4141 not in sb.by_pid and not sb.current
    sb.tick(0.0, busy_devices=set())
    assert [a["device"] for a in asked] == ["cuda:0", "cuda:0"]
    sb.on_spawned(2, 4242)
    sb.on_ready({"pid": 4242, "prep_s": 0.2})
    assert sb.current["cuda:0"].state is StandbyState.WAITING
    taken = sb.take("cuda:0")
    assert taken is not None and taken.pid == 4242 and taken.waited
    with pytest.raises(IllegalTransition):
        taken_rec = sb.by_pid[4242]
        taken_rec.to(StandbyState.WAITING)
    sb.took(4242, used=True)
    assert sb.on_exited(4242, 0) is False  # the worker's exit now, not a standby's
    # Deaths back off, then give up.
    for n in range(5):
        kit.now = 1000.0 + n * 10  # past each back-off, inside the flapping window
        sb.tick(kit.now, busy_devices=set())
        token = len(asked)
        sb.on_spawned(token, 5000 + n)
        assert sb.on_exited(5000 + n, 9)
    assert "cuda:0" in sb.given_up
    before = len(asked)
    sb.tick(2e9, busy_devices=set())
    assert len(asked) == before


def test_standby_config(tmp_path: Any) -> None:
    from pool.config import check_config, load_config, standby_wanted
    from pool.tomlwrite import write_config

    model = make_mlp(str(tmp_path / "m.pt"), seed=1)
    path = str(tmp_path / "pool.toml")
    write_config(path, {}, [{"name": "a", "path": model}, {"name": "b", "path": model,
                 "standby": False}, {"name": "c", "path": model, "standby": True}])  # fmt: skip
    cfg = load_config(path, env={})
    a, b, c = cfg.models
    assert cfg.pool.standby == "auto" and a.standby is None
    assert standby_wanted(cfg.pool, a, "cuda:0") and not standby_wanted(cfg.pool, a, "cpu")
    assert not standby_wanted(cfg.pool, b, "cuda:1") and standby_wanted(cfg.pool, c, "cpu")
    off = load_config(path, env={"GPU_POOL_STANDBY": "false"})
    assert not standby_wanted(off.pool, a, "cuda:0") and standby_wanted(off.pool, c, "cpu")
    write_config(path, {"standby": "yes"}, [{"name": "a", "path": model, "standby": 1}])
    problems = check_config(path, env={"GPU_POOL_STANDBY": "maybe"})
    assert any(p.startswith('models[0].standby: must be "auto", true or false') for p in problems)
    assert any(p.startswith("pool.standby: must be") for p in problems), problems
    assert any(p.startswith("env GPU_POOL_STANDBY: must be") for p in problems), problems


def test_unwanted_standby_is_let_go_not_counted_dead() -> None:
    kit = Kit()
    sb = kit.standbys
    sb.want(["cpu"])
    sb.tick(0.0, set())
    sb.on_spawned(1, 7001)
    sb.want([])  # its model was unloaded, or poold stops
    assert kit.signalled() == [7001] and not sb.current
    assert sb.on_exited(7001, 15) and sb.died == {} and not sb.next_try
    sb.stop_all()
    sb.want(["cpu"])  # a stopping poold wants none, whatever its models say
    sb.tick(10.0, set())
    assert sb.wanted == set() and not sb.current


def test_staged_weights_are_bit_identical(tmp_path: Any) -> None:
    """workers.weights.stage_file + to_device (the drain-first path through a standby)
    gives what safetensors gives, odd sizes, a scalar and an empty tensor included."""
    import safetensors.torch
    import torch

    from workers import weights

    g = torch.Generator().manual_seed(0)
    state = {
        "tag": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        "w": torch.randn(37, 1001, generator=g),
        "h": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "none": torch.empty(0, 4),
    }
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(state, path)
    staged = weights.stage_file(path, pin=False, threads=3)
    got = staged.to_device("cpu")
    staged.release()
    want = safetensors.torch.load_file(path)
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8))
    assert staged.data.numel() == 0  # released


def test_standby_metrics() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from pool.metrics import PoolMetrics, PoolSnapshot, StandbySample

    m = PoolMetrics()
    m.publish(
        PoolSnapshot(
            workers=(),
            queue_depth={},
            model_state={},
            standbys=(StandbySample("cuda:0", "waiting", 4242, 520 << 20, 768 << 20),),
            standbys_taken={"cuda:0": 3},
            standbys_died={"cuda:0": 1},
        )
    )
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(m.render().decode())
        for s in fam.samples
    }
    assert got[("gpupool_standby", (("device", "cuda:0"), ("state", "waiting")))] == 1
    assert got[("gpupool_standby_gpu_bytes", (("device", "cuda:0"), ("pid", "4242")))] == 520 << 20
    held = ("gpupool_standby_preload_bytes", (("device", "cuda:0"), ("pid", "4242")))
    assert got[held] == 768 << 20
    assert got[("gpupool_standby_taken_total", (("device", "cuda:0"),))] == 3
    assert got[("gpupool_standby_died_total", (("device", "cuda:0"),))] == 1


def test_deferred_host_frees_wait_for_the_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import host_frees, weights

    freed: list[int] = []
    monkeypatch.setattr(host_frees, "_free_host_cache", lambda: freed.append(1))
    weights.defer_host_frees(True)
    try:
        weights._empty_host_cache()  # what a load does when it ends
        weights._empty_host_cache()
        assert freed == []
        assert weights.defer_host_frees(False)  # pending, and no longer deferring
        assert weights.flush_host_frees() and freed == [1]
        assert not weights.flush_host_frees()
        weights._empty_host_cache()
        assert freed == [1, 1]  # not deferred: at once
    finally:
        weights.defer_host_frees(False)
        weights.flush_host_frees()
