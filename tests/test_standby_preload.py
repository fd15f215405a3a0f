"""A standby that holds the serving version on the host (``standby_preload``, pool.preload):
on the CPU, one model on the device, so its standby preloads it. A crash replacement
starts from the preload; an upgrade to another version drops it and loads as before;
the next standby preloads the new version; a file rewritten after the preload is not
used; a stale preload is replaced; ``standby_preload = false`` preloads nothing."""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from modelkit import make_mlp, mlp_answer_problem, mlp_input, mlp_reference
from poolkit import Load, Pool, running_pool, wait_for
from standbykit import Kit

from pool.host_files import LocalFiles
from pool.preload import PreloadSpec, PreloadState, admit

SEEDS = {"1": 1, "2": 2, "3": 3}


def check(x: Any, r: Any) -> str | None:
    return mlp_answer_problem(SEEDS, x, r)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = str(tmp_path_factory.mktemp("preload"))
    models = os.path.join(d, "models")
    for v, seed in SEEDS.items():
        make_mlp(os.path.join(models, f"v{v}.pt"), seed=seed)
    cfg = [{"name": "m", "path": os.path.join(models, "v1.pt"), "version": "1",
            "devices": ["cpu"]}]  # fmt: skip
    with running_pool(d, cfg, standby=True, standby_preload=True) as p:
        yield p


def preloaded_standby(pool: Pool, version: str, other_than: int | None = None) -> dict[str, Any]:
    """The cpu standby once it waits holding ``version`` on the host."""

    def ready() -> dict[str, Any] | None:
        for sb in pool.status()["standby"]["standbys"]:
            pre = sb.get("preload") or {}
            if (
                sb["state"] == "waiting"
                and sb["pid"] != other_than
                and pre.get("state") == "loaded"
                and pre.get("version") == version
            ):
                return sb
        return None

    found: dict[str, Any] = wait_for(ready, 60, f"a standby holding v{version}")
    return found


def ready_workers(pool: Pool) -> list[dict[str, Any]]:
    return [w for w in pool.model("m")["workers"] if w["state"] == "ready"]


def upgrade(pool: Pool, version: str, strategy: str) -> dict[str, Any]:
    path = os.path.join(pool.dir, "models", f"v{version}.pt")
    args = {"model": "m", "path": path, "version": version, "strategy": strategy}
    return pool.ctl("upgrade", args, timeout_s=120)


def kill_and_replace(pool: Pool, sb: dict[str, Any]) -> dict[str, Any]:
    (old,) = ready_workers(pool)
    with Load(pool.frontend, "m", 2, check=check) as load:
        load.wait_ok(5)
        os.kill(old["pid"], signal.SIGKILL)
        new: dict[str, Any] = wait_for(
            lambda: [w for w in ready_workers(pool) if w["pid"] != old["pid"]],
            60,
            "a replacement worker",
        )[0]
        load.wait_ok(10)
    assert not load.errors, load.errors[:3]
    assert new["pid"] == sb["pid"] and new["from_standby"]
    return new


@pytest.mark.slow
def test_crash_replacement_starts_from_the_preload(pool: Pool) -> None:
    sb = preloaded_standby(pool, "1")
    assert sb["preload"]["bytes"] > 0 and sb["preload"]["model"] == "m"
    new = kill_and_replace(pool, sb)
    assert new["preloaded"] and new["version"] == "1"
    with pool.client() as c:
        x = mlp_input(3, seed=5)
        assert check(x, c.infer("m", x)) is None
    preloaded_standby(pool, "1", other_than=sb["pid"])  # replenished, preloaded again


@pytest.mark.slow
def test_upgrades_drop_the_preload_and_the_next_standby_holds_the_new_version(
    pool: Pool,
) -> None:
    sb = preloaded_standby(pool, "1")
    res = upgrade(pool, "2", "surge")
    assert res["ok"], res
    data = res["data"]
    assert data["pids_started"] == [sb["pid"]]
    assert "preloaded" not in data["worker_timings"]  # v1 was preloaded, v2 was loaded
    sb = preloaded_standby(pool, "2", other_than=sb["pid"])
    res = upgrade(pool, "3", "drain-first")
    assert res["ok"], res
    assert res["data"]["standby"] == {"taken": 1, "staged": True}
    assert res["data"]["pids_started"] == [sb["pid"]]
    sb = preloaded_standby(pool, "3", other_than=sb["pid"])
    new = kill_and_replace(pool, sb)
    assert new["preloaded"] and new["version"] == "3"
    # Run directories (the sandbox's, where it applies) of gone workers and standbys
    # are removed: what is left belongs to live ones (the serving worker keeps the one
    # of the standby it was).
    wait_for(lambda: not stale_run_dirs(pool, sb["sid"]), 5, "run dirs of live processes only")


def stale_run_dirs(pool: Pool, serving_sid: str) -> set[str]:
    live = {w["wid"] for w in pool.model("m")["workers"]} | {serving_sid}
    live |= {s["sid"] for s in pool.status()["standby"]["standbys"]}
    found = glob.glob(os.path.join(pool.run_dir, "**", "w", "*"), recursive=True)
    return {os.path.basename(d) for d in found} - live


def test_a_rewritten_file_is_not_taken_from_the_preload(tmp_path: Any) -> None:
    import torch

    from workers.main import WorkerSpec
    from workers.preload import Preloaded, preload

    path = make_mlp(str(tmp_path / "m.pt"), seed=1)
    request = {"key": "m:1:" + path, "model": "m", "version": "1", "path": path,
               "model_roots": [str(tmp_path)], "sandbox": {}}  # fmt: skip
    reports: list[dict[str, Any]] = []

    def loaded() -> Preloaded:
        pre = preload(request, "cpu", reports.append)
        assert pre.thread is not None
        pre.thread.join(30)
        return pre

    pre = loaded()
    assert reports[-1]["ok"] and reports[-1]["bytes"] == os.path.getsize(path), reports
    assert reports[-1]["key"] == "m:1:" + path
    spec = WorkerSpec(wid="w1", backend="", model="m", path=path, version="1", device="cpu",
                      generation=1)  # fmt: skip
    other = WorkerSpec(**{**spec.__dict__, "version": "2"})
    assert pre.take(other) is None and pre.staged is None  # another version: dropped
    pre = loaded()
    make_mlp(path + ".new", seed=2)
    os.replace(path + ".new", path)  # same path and version, another file
    assert pre.take(spec) is None and pre.staged is None
    # Taken while still reading: the take waits for the read.
    pre = preload(request, "cpu", reports.append)
    staged = pre.take(spec)
    assert staged is not None
    model = staged.to_device(torch.device("cpu"))
    x = mlp_input(2, seed=1)
    got = model.forward([torch.from_numpy(x)])[0].numpy()
    assert np.allclose(got, mlp_reference(2, x), rtol=1e-5, atol=1e-6)
    bad = preload({**request, "path": str(tmp_path / "missing.pt")}, "cpu", reports.append)
    assert bad.thread is not None
    bad.thread.join(30)
    assert not reports[-1]["ok"] and reports[-1]["reason"] and bad.staged is None


def spec(
    version: str, path: str = "/m/v.pt", setting: str | bool = True, sandbox: str | bool = False
) -> PreloadSpec:
    return PreloadSpec("m", version, path, setting, sandbox, ("/m",), "/run/w")


def test_stale_preload_is_replaced_once_the_device_is_idle(tmp_path: Any) -> None:
    model = str(tmp_path / "v.pt")
    with open(model, "wb") as f:
        f.write(b"x" * 100)
    kit = Kit()
    asked, sb = kit.asked, kit.standbys
    target = {"spec": spec("1", model)}
    sb.preload_target = lambda device: target["spec"]
    sb.want(["cpu"])
    sb.tick(0.0, set())
    assert asked[0]["preload"]["version"] == "1"
    assert asked[0]["preload"]["sandbox"]["run_dir"] == "/run/w/" + asked[0]["sid"]
    sb.on_spawned(1, 7001)
    sb.on_ready({"pid": 7001})
    sb.on_preloaded({"pid": 7001, "key": "m:1:" + model, "ok": True, "bytes": 100})
    assert sb.current["cpu"].preload is not None
    assert sb.current["cpu"].preload.state is PreloadState.LOADED
    # The serving version changed, the standby not taken (its workers are sandboxed).
    target["spec"] = spec("2", model, sandbox="auto")
    sb.tick(1.0, {"cpu"})
    assert not kit.signalled()  # busy: an operation runs there
    sb.tick(2.0, set())
    assert kit.signalled() == [7001] and asked[1]["preload"]["version"] == "2"
    assert sb.on_exited(7001, 15) and sb.died == {}  # let go, not dead
    sb.on_spawned(2, 7002)
    # A take for the preloaded version says so; for a path its sandbox cannot read, it
    # is let go and a standby without a preload is taken instead.
    sb.on_preloaded({"pid": 7002, "key": "m:2:" + model, "ok": True, "bytes": 100})
    t = sb.take("cpu", model, "m:2:" + model)
    assert t is not None and t.pid == 7002 and t.preloaded
    sb.tick(3.0, set())
    sb.on_spawned(3, 7003)
    t = sb.take("cpu", "/elsewhere/v.pt", "m:9:/elsewhere/v.pt")
    assert kit.signalled()[-1] == 7003 and t is not None and t.token == 4 and not t.preloaded
    assert "preload" not in asked[3]


class FakeHost:
    """The HostFiles port over a dictionary of file sizes, a RAM figure and symlinks."""

    def __init__(self, sizes: dict[str, int], ram: int | None, links: dict[str, str]) -> None:
        self.sizes, self.ram, self.links = sizes, ram, links

    def size(self, path: str) -> int:
        if path not in self.sizes:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.sizes[path]

    def mem_available(self) -> int | None:
        return self.ram

    def realpath(self, path: str) -> str:
        for link, target in self.links.items():
            if path == link or path.startswith(link + "/"):
                return target + path[len(link) :]
        return path


def test_admit_and_readable() -> None:
    host = FakeHost({"/m/a/v.pt": 4096}, 4 * 4096, {"/m/b/link": "/n"})
    auto = PreloadSpec("m", "1", "/m/a/v.pt", "auto", "auto", (), "/r")
    assert admit(auto, host)[0]
    host.ram = 4 * 4096 - 1
    ok, why = admit(auto, host)
    assert not ok and "25%" in why
    host.ram = None
    ok, why = admit(auto, host)
    assert not ok and "unknown" in why
    assert admit(PreloadSpec("m", "1", "/m/a/v.pt", True, "auto", (), "/r"), host)[0]
    ok, why = admit(PreloadSpec("m", "1", "/m/a/x.pt", True, "auto", (), "/r"), host)
    assert not ok and "cannot read /m/a/x.pt" in why
    s = PreloadSpec("m", "1", "/m/a/v.pt", True, "auto", ("/m/b",), "/r")
    assert s.readable("/m/b/v.pt", host) and s.readable("/m/a/w.pt", host)
    assert not s.readable("/n/v.pt", host)
    assert not s.readable("/m/b/link/v.pt", host)  # a link out of the roots: not reachable
    assert spec("1", "/m/a/v.pt").readable("/n/v.pt", host)  # sandbox = false: nothing confines it


def test_the_local_host_reads_real_files(tmp_path: Any) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"x" * 4096)
    host = LocalFiles()
    assert host.size(str(path)) == 4096
    ram = host.mem_available()
    assert ram is None or ram > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 10 kB\nMemAvailable:    3 kB\n")
    assert LocalFiles(str(meminfo)).mem_available() == 3072
    assert LocalFiles(str(tmp_path / "none")).mem_available() is None


def test_preload_config(tmp_path: Any) -> None:
    from pool.config import load_config
    from pool.preload import preload_setting
    from pool.tomlwrite import write_config

    model = make_mlp(str(tmp_path / "m.pt"), seed=1)
    path = str(tmp_path / "pool.toml")
    write_config(path, {"standby_preload": False}, [{"name": "a", "path": model},
                 {"name": "b", "path": model, "standby_preload": "auto"}])  # fmt: skip
    cfg = load_config(path, env={})
    a, b = cfg.models
    assert preload_setting(cfg.pool, a) is False and preload_setting(cfg.pool, b) == "auto"
    assert load_config(path, env={"GPU_POOL_STANDBY_PRELOAD": "true"}).pool.standby_preload is True
