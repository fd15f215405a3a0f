"""Runtime model management and reload against one real poold: load, unload, scale,
list; reload that removes, rescales or breaks; and a restart that keeps all of it."""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from modelkit import make_corrupt, make_mlp, mlp_input, mlp_reference
from poolkit import Load, Pool, running_pool, start_pool, wait_for, write_config

ALLOWED = frozenset({"MODEL_UNAVAILABLE", "NO_SUCH_MODEL"})  # after unload began: refused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rig:
    """One poold, its model files, and the config file it reloads."""

    def __init__(self, pool: Pool, models: str, port: int) -> None:
        self.pool = pool
        self.models = models
        self.port = port

    def path(self, name: str) -> str:
        return os.path.join(self.models, name)

    def write(self, models: list[dict[str, Any]]) -> None:
        with open(self.pool.config, "rb") as f:
            section = dict(tomllib.load(f)["pool"])
        write_config(self.pool.config, section, models)

    def json(self, *args: str) -> tuple[int, dict[str, Any]]:
        out = self.pool.pool_ctl(*args, "--json")
        assert out.stdout, out.stderr
        return out.returncode, json.loads(out.stdout)

    def names(self) -> list[str]:
        return sorted(m["name"] for m in self.pool.status()["models"])

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        return str(urllib.request.urlopen(url, timeout=5).read().decode())

    def readyz(self) -> tuple[int, str]:
        try:
            r = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5)
            return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    d = str(tmp_path_factory.mktemp("manage"))
    models = os.path.join(d, "models")
    for i in range(1, 4):
        make_mlp(os.path.join(models, f"v{i}.pt"), seed=i)
    make_corrupt(os.path.join(models, "broken.pt"))
    port = free_port()
    a = {"name": "a", "path": os.path.join(models, "v1.pt"), "version": "1", "devices": ["cpu"]}
    with running_pool(d, [a], metrics=f"127.0.0.1:{port}") as p:
        yield Rig(p, models, port)


def entry(rig: Rig, name: str, file: str, version: str, n: int = 1) -> dict[str, Any]:
    return {"name": name, "path": rig.path(file), "version": version, "devices": ["cpu"] * n}


@pytest.mark.slow
def test_reload_removing_a_model_under_load_drains_it_and_forgets_it(rig: Rig) -> None:
    rig.write([entry(rig, "a", "v1.pt", "1"), entry(rig, "b", "v2.pt", "2")])
    code, out = rig.json("reload")
    assert code == 0, out
    assert {o["model"]: o["outcome"] for o in out["outcomes"]} == {"a": "kept", "b": "started"}
    rig.pool.wait_serving()
    # The file is b's record: topology.json holds only what pool-ctl changed.
    topo = os.path.join(rig.pool.dir, "state", "topology.json")
    assert not os.path.exists(topo) or "b" not in json.load(open(topo))["models"]
    # Heartbeats keep coming from b's draining workers while the reload removes it: that
    # used to raise KeyError out of the supervisor and kill poold.
    with Load(rig.pool.frontend, "b", clients=4, allowed=ALLOWED) as load:
        load.wait_ok(50)
        rig.write([entry(rig, "a", "v1.pt", "1")])
        code, out = rig.json("reload")
        assert code == 0, out
        assert {o["model"]: o["outcome"] for o in out["outcomes"]} == {"a": "kept", "b": "stopped"}
    assert load.errors == [], load.errors[:5]
    assert rig.pool.proc.poll() is None
    assert rig.names() == ["a"]  # nothing parked under another name, nothing "starting"
    assert rig.pool.pool_ctl("health").returncode == 0
    assert rig.readyz()[0] == 200
    wait_for(lambda: 'model="b"' not in rig.metrics(), 10, "b's series gone")


@pytest.mark.slow
def test_reload_keeps_a_version_pool_ctl_committed(rig: Rig) -> None:
    out = rig.pool.pool_ctl("upgrade", "a", rig.path("v2.pt"), "--version", "2")
    assert out.returncode == 0, out.stderr
    # The file still says v1 for a; only its worker count changes.
    rig.write([entry(rig, "a", "v1.pt", "1", n=2)])
    code, res = rig.json("reload")
    assert code == 0, res
    assert [(o["model"], o["outcome"]) for o in res["outcomes"]] == [("a", "rescaled")]
    a = rig.pool.model("a")
    assert a["version"] == "2" and len(a["workers"]) == 2, a
    with rig.pool.client() as c:
        x = mlp_input(3)
        r = c.infer("a", x)
        assert r.version == "2"
        np.testing.assert_allclose(r.outputs[0], mlp_reference(2, x), rtol=1e-5, atol=1e-6)


def test_reload_with_a_broken_config_fails_and_changes_nothing(rig: Rig) -> None:
    with open(rig.pool.config, "a") as f:
        f.write("\n[[models]]\nname = 'bad'\n")  # no path
    out = rig.pool.pool_ctl("reload")
    assert out.returncode == 1, out
    assert "path: required" in out.stdout + out.stderr
    assert rig.names() == ["a"]


@pytest.mark.slow
def test_reload_that_starts_a_broken_model_waits_and_fails(rig: Rig) -> None:
    # "a" as the broken reload will name it first: this test may run alone, or on another
    # xdist process than the one that rescaled "a" before it.
    rig.write([entry(rig, "a", "v1.pt", "1", n=2)])
    assert rig.json("reload")[0] == 0
    rig.write([entry(rig, "a", "v1.pt", "1", n=2), entry(rig, "z", "broken.pt", "1")])
    code, res = rig.json("reload")
    assert code == 1, res
    outcomes = {o["model"]: o for o in res["outcomes"]}
    assert outcomes["a"]["outcome"] == "kept" and outcomes["z"]["outcome"] == "failed"
    assert "load" in outcomes["z"]["detail"], outcomes
    assert rig.names() == ["a"]
    rig.write([entry(rig, "a", "v1.pt", "1", n=2)])
    assert rig.json("reload")[0] == 0


@pytest.mark.slow
def test_load_scale_list_unload_zero_loss(rig: Rig) -> None:
    out = rig.pool.pool_ctl("load", "c", rig.path("v3.pt"), "--version", "3", "--devices", "cpu")
    assert out.returncode == 0, out.stderr
    assert "c: loaded" in out.stdout
    again = rig.pool.pool_ctl("load", "c", rig.path("v3.pt"))
    assert again.returncode == 1 and "already loaded" in again.stderr
    outside = rig.pool.pool_ctl("load", "d", "/etc/passwd")
    assert outside.returncode == 1 and "allowed model roots" in outside.stderr
    bad = rig.pool.pool_ctl("load", "d", rig.path("v3.pt"), "--devices", "gpu7")
    assert bad.returncode == 1 and "devices" in bad.stderr
    with Load(rig.pool.frontend, "c", clients=3) as load:
        load.wait_ok(30)
        code, res = rig.json("scale", "c", "--devices", "cpu", "cpu")
        assert code == 0, res
        load.wait_ok(30)
    assert load.errors == [], load.errors[:5]
    c = rig.pool.model("c")
    assert c["version"] == "3" and [w["device"] for w in c["workers"]] == ["cpu", "cpu"]
    listed = rig.pool.pool_ctl("list")
    assert listed.returncode == 0
    assert any(line.split()[:3] == ["c", "3", "serving"] for line in listed.stdout.splitlines())
    with Load(rig.pool.frontend, "c", clients=3, allowed=ALLOWED) as load:
        load.wait_ok(30)
        code, res = rig.json("unload", "c")
        assert code == 0 and res["unanswered"] == 0, res
    assert load.errors == [], load.errors[:5]
    assert "c" not in rig.names()
    assert rig.pool.pool_ctl("unload", "c").returncode == 1
    wait_for(lambda: 'model="c"' not in rig.metrics(), 10, "c's series gone")


@pytest.mark.slow
def test_a_restart_comes_back_to_the_pool_the_operator_left(tmp_path: Any) -> None:
    d = str(tmp_path)
    models = os.path.join(d, "models")
    a, b = make_mlp(f"{models}/a.pt", seed=1), make_mlp(f"{models}/b.pt", seed=2)
    cfg = [
        {"name": "a", "path": a, "version": "1", "devices": ["cpu"]},
        {"name": "b", "path": b, "version": "2", "devices": ["cpu"]},
    ]
    with running_pool(d, cfg) as p:
        assert p.pool_ctl("load", "c", b, "--version", "7").returncode == 0
        assert p.pool_ctl("scale", "a", "--devices", "cpu", "cpu").returncode == 0
        assert p.pool_ctl("unload", "b").returncode == 0
    again = start_pool(d, cfg)
    try:
        st = {m["name"]: m for m in again.status()["models"]}
        assert sorted(st) == ["a", "c"]
        assert len(st["a"]["workers"]) == 2 and st["c"]["version"] == "7"
    finally:
        again.stop()


@pytest.mark.slow
def test_one_broken_model_does_not_hold_the_pool_hostage(tmp_path: Any, monkeypatch: Any) -> None:
    d = str(tmp_path)
    good = make_mlp(f"{d}/models/good.pt", seed=1)
    bad = make_corrupt(f"{d}/models/bad.pt")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"{d}/notify.sock")
    sock.settimeout(60)
    monkeypatch.setenv("NOTIFY_SOCKET", f"{d}/notify.sock")
    port = free_port()
    cfg = [
        {"name": "good", "path": good, "version": "1", "devices": ["cpu"]},
        {"name": "bad", "path": bad, "version": "1", "devices": ["cpu"]},
    ]
    pool = start_pool(d, cfg, wait=False, keep_notify=True, metrics=f"127.0.0.1:{port}")
    try:
        seen: list[str] = []
        while not any(x.startswith("READY=1") for x in seen):
            seen.append(sock.recv(4096).decode())
        ready = next(x for x in seen if x.startswith("READY=1"))
        assert "degraded: serving 1 of 2" in ready and "bad" in ready, ready
        assert pool.model("good")["status"] == "serving"  # READY came once good served
        with pool.client() as c:
            assert c.infer("good", mlp_input(1)).version == "1"
        rig = Rig(pool, f"{d}/models", port)
        code, body = rig.readyz()
        assert code == 200, body
        line = next(x for x in body.splitlines() if x.startswith("bad:"))
        assert "load" in line, body  # names what failed, not just "not ready"
        assert any(x.startswith("good: serving") for x in body.splitlines()), body
        assert pool.pool_ctl("health").returncode == 1  # strict: not every model serves
    finally:
        pool.stop()
        sock.close()


@pytest.mark.slow
def test_cancel_and_ctrl_c_roll_an_upgrade_back(rig: Rig) -> None:
    import signal
    import subprocess
    import sys

    from modelkit import make_factory_model

    slow = make_factory_model(rig.path("slow"), seed=5, load_sleep_s=60)
    before = rig.pool.model("a")["version"]
    cmd = [sys.executable, "-m", "pool.ctl.cli", "--control", rig.pool.control]

    started: list[subprocess.Popen[str]] = []

    def upgrade() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [*cmd, "upgrade", "a", slow, "--version", "slow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A suite started in the background by a non-interactive shell inherits SIGINT
            # ignored, and Python then keeps it so: Ctrl-C is what is tested, so reset it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        started.append(p)  # killed and closed below whatever happens: no leak into
        # later tests' warnings
        # Past the hashing (a cancel then is test_a_cancel_while_the_file_hashes_*): the
        # new version's workers are loading, so there is something to roll back.
        wait_for(
            lambda: any(w["version"] == "slow" for w in rig.pool.model("a")["workers"]),
            30,
            "the upgrade's new workers",
        )
        return p

    try:
        p = upgrade()
        out = rig.pool.pool_ctl("cancel", "a")
        assert out.returncode == 0 and "cancelling upgrade" in out.stdout, out
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 1 and "cancelled by pool-ctl cancel" in stdout + stderr
        assert rig.pool.model("a")["version"] == before
        p = upgrade()
        p.send_signal(signal.SIGINT)  # what Ctrl-C does
        stdout, stderr = p.communicate(timeout=60)
    finally:
        for q in started:
            q.kill()
            q.communicate()
    assert p.returncode == 1 and "cancelling" in stderr and "cancelled" in stdout, (stdout, stderr)
    a = rig.pool.model("a")
    assert a["version"] == before and a["operation"] is None
    assert all(w["version"] == before for w in a["workers"])
    nothing = rig.pool.pool_ctl("cancel", "a")
    assert nothing.returncode == 1 and "no upgrade or rollback" in nothing.stderr
    hist = json.loads(rig.pool.pool_ctl("history", "a", "--json").stdout)["history"]
    assert [h["outcome"] for h in hist[-2:]] == ["rolled_back", "rolled_back"]
    log = rig.pool.log()
    assert "upgrade of a requested: " in log and "by uid " in log and "sha256:" in log
    assert "upgrade of a to slow: strategy" in log


@pytest.mark.slow
def test_a_cancel_while_the_file_hashes_ends_the_upgrade_before_any_worker(rig: Rig) -> None:
    """Ctrl-C right after ``pool-ctl upgrade``, while a big file is still hashed: the
    cancel was refused ("no upgrade or rollback running") and the upgrade went on. Now it
    ends there, nothing started, the serving version kept, nothing in the history."""
    import subprocess
    import sys

    from pool.ctl.client import ControlClient

    big = rig.path("big.pt")
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: hashing 3 GiB of zeros takes seconds, costs no disk
    before = rig.pool.model("a")
    hist_before = json.loads(rig.pool.pool_ctl("history", "a", "--json").stdout)["history"]
    cmd = [sys.executable, "-m", "pool.ctl.cli", "--control", rig.pool.control]
    p = subprocess.Popen([*cmd, "upgrade", "a", big, "--version", "big"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: rig.pool.model("a")["operation"] == "upgrade", 30, "the upgrade")
        answer = ControlClient(rig.pool.control).call("cancel", {"model": "a"})
        assert answer["ok"], answer
        assert answer["data"]["target_version"] == "big"
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
        os.unlink(big)
    assert p.returncode == 1 and "cancelled by pool-ctl cancel" in stdout + stderr, (stdout, stderr)
    after = rig.pool.model("a")
    assert after["version"] == before["version"] and after["operation"] is None
    assert sorted(w["pid"] for w in after["workers"]) == sorted(
        w["pid"] for w in before["workers"]
    )  # no worker started or stopped
    hist = json.loads(rig.pool.pool_ctl("history", "a", "--json").stdout)["history"]
    assert hist == hist_before


def _pids(pool: Pool, name: str) -> list[int]:
    return sorted(w["pid"] for w in pool.model(name)["workers"])


@pytest.mark.slow
def test_scale_keeps_the_workers_that_stay_and_the_live_version(tmp_path: Any) -> None:
    d = str(tmp_path)
    v1, v2 = make_mlp(f"{d}/models/v1.pt", seed=1), make_mlp(f"{d}/models/v2.pt", seed=2)
    cfg = [{"name": "s", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(d, cfg) as p:
        rig = Rig(p, f"{d}/models", 0)
        assert p.pool_ctl("upgrade", "s", v2, "--version", "2").returncode == 0
        first = _pids(p, "s")
        with Load(p.frontend, "s", clients=3) as load:
            load.wait_ok(30)
            code, up = rig.json("scale", "s", "--devices", "cpu", "cpu")
            assert code == 0, up
            assert up["pids_kept"] == first and up["pids_stopped"] == [], up
            assert len(up["pids_started"]) == 1 and up["version"] == "2", up
            assert _pids(p, "s") == sorted(first + up["pids_started"])
            load.wait_ok(30)
            out = p.pool_ctl("scale", "s", "--devices", "cpu", "cpu", "cpu")
            assert out.returncode == 0, out.stderr
            assert f"kept pids {sorted(first + up['pids_started'])}" in out.stdout, out.stdout
            assert "started pids [" in out.stdout and "stopped pids []" in out.stdout
            code, down = rig.json("scale", "s", "--devices", "cpu")
            assert code == 0, down
            assert down["pids_kept"] == first and len(down["pids_stopped"]) == 2, down
            assert _pids(p, "s") == first
            load.wait_ok(30)
            # The file still says v1 on one cpu: only its device list changes.
            rig.write([{**cfg[0], "devices": ["cpu", "cpu"]}])
            code, res = rig.json("reload")
            assert code == 0, res
            assert [(o["model"], o["outcome"]) for o in res["outcomes"]] == [("s", "rescaled")]
            load.wait_ok(30)
            two = _pids(p, "s")
            # A worker that cannot boot (no GPU here): the others stay, nothing is retired.
            code, bad = rig.json("scale", "s", "--devices", "cuda:0", "cpu")
            assert code == 1 and bad["pids_stopped"] == [] and bad["pids_started"] == [], bad
            assert _pids(p, "s") == two and p.model("s")["devices"] == ["cpu", "cpu"]
            load.wait_ok(30)
        assert load.errors == [], load.errors[:5]
        s = p.model("s")
        assert set(first) < {w["pid"] for w in s["workers"]} and len(s["workers"]) == 2, s
        assert {w["version"] for w in s["workers"]} == {"2"} and s["version"] == "2"
        with p.client() as c:
            x = mlp_input(2)
            r = c.infer("s", x)
            assert r.version == "2"
            np.testing.assert_allclose(r.outputs[0], mlp_reference(2, x), rtol=1e-5, atol=1e-6)
        hist = json.loads(p.pool_ctl("history", "s", "--json").stdout)["history"]
        assert [h["action"] for h in hist[-3:]] == ["scale", "scale", "scale"], hist[-3:]
        assert hist[-1]["outcome"] == "rolled_back" and hist[-2]["outcome"] == "committed"
    again = start_pool(d, [{**cfg[0], "devices": ["cpu", "cpu"]}])
    try:
        s = again.model("s")
        assert s["version"] == "2" and len(s["workers"]) == 2, s
    finally:
        again.stop()


def _loading(msgs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(m["bytes"], m["total"]) for m in msgs if m.get("phase") == "loading" and "bytes" in m]


@pytest.mark.slow
def test_load_and_upgrade_report_the_bytes_a_worker_has_loaded(rig: Rig) -> None:
    from modelkit import make_big_mlp

    one = make_big_mlp(rig.path("big1.pt"), hidden=512, layers=4, seed=1)  # 4 MiB of weights
    two = make_big_mlp(rig.path("big2.pt"), hidden=512, layers=4, seed=2)
    size = os.path.getsize(one)
    for cmd, args in (
        ("load", {"model": "big", "path": one, "version": "1", "devices": ["cpu"]}),
        ("upgrade", {"model": "big", "path": two, "version": "2"}),
    ):
        seen: list[dict[str, Any]] = []
        res = rig.pool.ctl(cmd, args, timeout_s=120, progress=seen.append)
        assert res["ok"], res
        steps = _loading(seen)
        total = os.path.getsize(args["path"])
        assert {t for _, t in steps} == {total}, steps
        done = [b for b, _ in steps]
        assert done == sorted(done) and len(set(done)) == len(done), steps  # increasing
        assert done[0] < total and done[-1] == total and len(done) >= size >> 20, steps
    # In a pipe pool-ctl prints the phases only; --json stays one document.
    three = make_big_mlp(rig.path("big3.pt"), hidden=512, layers=4, seed=3)
    out = rig.pool.pool_ctl("upgrade", "big", three, "--version", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["to_version"] == "3"
    assert "MiB" not in out.stderr
    # On a terminal (stderr a pty): the bar, redrawn in place, while the worker loads.
    import pty
    import subprocess
    import sys

    four = make_big_mlp(rig.path("big4.pt"), hidden=512, layers=4, seed=4)
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "pool.ctl.cli", "--control", rig.pool.control]
    try:
        proc = subprocess.run(
            [*cmd, "upgrade", "big", four, "--version", "4", "--json"],
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=120,
            text=True,
        )
        os.close(slave)
        seen = b""
        while True:
            try:
                part = os.read(master, 65536)
            except OSError:  # EIO: the pty's last writer is gone
                break
            if not part:
                break
            seen += part
    finally:
        os.close(master)
    assert proc.returncode == 0 and json.loads(proc.stdout)["to_version"] == "4"
    term = seen.decode(errors="replace")
    full = f"{os.path.getsize(four) / (1 << 20):.1f} MiB"
    assert re.search(rf"\r\[ *[0-9.]+s\] loading +\[#+\] {full} / {full} 100%", term), term
    assert rig.pool.pool_ctl("unload", "big").returncode == 0
