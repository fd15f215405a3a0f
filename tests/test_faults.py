"""Faults against a real poold on the CPU, with clients sending throughout: every request
gets a correct answer or its documented error, and the pool serves normally afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from modelkit import make_factory_model, make_mlp, mlp_input, mlp_reference
from poolkit import Load, Pool, running_pool, start_pool, wait_for

from router.client import Client
from router.errors import DeadlineExceeded, ModelUnavailable, Overloaded, WorkerLost

# Every test here starts a real pool: the full suite, not the fast tier.
pytestmark = pytest.mark.slow


def mlp_check(seed: int):  # type: ignore[no-untyped-def]
    def check(x: np.ndarray, r: object) -> str | None:
        want = mlp_reference(seed, x)
        got = r.outputs[0]  # type: ignore[attr-defined]
        return None if np.allclose(got, want, rtol=1e-5, atol=1e-6) else "wrong answer"

    return check


def negative_input(i: int) -> np.ndarray:
    return -np.ones((1, 16), np.float32)


def worker_pids(pool: Pool, model: str) -> list[int]:
    return [w["pid"] for w in pool.model(model)["workers"] if w["state"] == "ready"]


@pytest.fixture()
def crashy(tmp_path: object) -> Pool:
    """'good' serves normally; 'trap' dies (exit) or hangs on a negative input."""
    d = str(tmp_path)
    good = make_mlp(os.path.join(d, "good", "m.pt"), seed=4)
    exits = make_factory_model(
        os.path.join(d, "exits"), seed=5, forward="exit", only_if_negative=True
    )
    hangs = make_factory_model(
        os.path.join(d, "hangs"), seed=6, forward="hang", only_if_negative=True
    )
    models = [
        {"name": "good", "path": good, "devices": ["cpu", "cpu"]},
        {"name": "exits", "path": exits, "devices": ["cpu", "cpu"]},
        {
            "name": "noretry",
            "path": exits,
            "devices": ["cpu", "cpu"],
            "retry_on_worker_loss": False,
        },
        {"name": "hangs", "path": hangs, "devices": ["cpu", "cpu"], "request_timeout_s": 2.0},
    ]
    with running_pool(d, models, request_grace_s=1.0) as pool:
        yield pool


def test_sigkilled_worker_requests_are_retried_and_it_is_replaced(crashy: Pool) -> None:
    pool = crashy
    with (
        Load(pool.frontend, "exits", 8, check=mlp_check(5)) as load,
        Load(pool.frontend, "good", 4, check=mlp_check(4)) as other,
    ):
        load.wait_ok(200)
        victim = worker_pids(pool, "exits")[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                victim not in worker_pids(pool, "exits") and len(worker_pids(pool, "exits")) == 2
            ),
            30,
            "a replacement worker",
        )
        load.wait_ok(200)
        other.wait_ok(50)
    assert not load.errors, load.errors[:3]  # in-flight requests were retried elsewhere
    assert not other.errors
    log = pool.log()
    assert f"[pid {victim}]" in log and "killed by SIGKILL" in log


def test_crash_in_forward_retried_once_then_worker_lost(crashy: Pool) -> None:
    """A request that kills every worker it reaches: retried once, then WORKER_LOST."""
    pool = crashy
    with Load(pool.frontend, "good", 4, check=mlp_check(4)) as other:
        with Client(pool.frontend, retries=1, timeout=30) as c:
            with pytest.raises(WorkerLost) as lost:
                c.infer("exits", negative_input(0))
            assert "exited" in lost.value.message
            with pytest.raises(WorkerLost):
                c.infer("noretry", negative_input(0))
        wait_for(lambda: len(worker_pids(pool, "exits")) == 2, 30, "replacements")
        wait_for(lambda: len(worker_pids(pool, "noretry")) == 2, 30, "replacements")
        other.wait_ok(50)
    assert not other.errors
    with Client(pool.frontend) as c:
        x = mlp_input(2)
        np.testing.assert_allclose(
            c.infer("exits", x).outputs[0], mlp_reference(5, x), rtol=1e-5, atol=1e-6
        )


def test_hung_forward_is_killed_and_replaced(crashy: Pool) -> None:
    pool = crashy
    with Load(pool.frontend, "hangs", 4, check=mlp_check(6)) as load:
        load.wait_ok(50)
        before = set(worker_pids(pool, "hangs"))
        with Client(pool.frontend, retries=1, timeout=30) as c:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                c.infer("hangs", negative_input(0), timeout=2.0)
            assert time.monotonic() - t0 < 10
        wait_for(
            lambda: (
                len(set(worker_pids(pool, "hangs")) - before) >= 1
                and len(worker_pids(pool, "hangs")) == 2
            ),
            30,
            "the hung worker replaced",
        )
        load.wait_ok(50)
    assert not load.errors, load.errors[:3]
    log = pool.log()
    assert "hung" in log and "Current thread" in log  # faulthandler's stack dump


def test_model_that_cannot_start_is_marked_failed(tmp_path: object) -> None:
    d = str(tmp_path)
    good = make_mlp(os.path.join(d, "good", "m.pt"), seed=4)
    broken = os.path.join(d, "broken", "m.pt")
    os.makedirs(os.path.dirname(broken))
    with open(broken, "wb") as f:
        f.write(b"not a model")
    models = [
        {"name": "good", "path": good, "devices": ["cpu"]},
        {"name": "broken", "path": broken, "devices": ["cpu"]},
    ]
    pool = start_pool(d, models, wait=False)
    try:
        wait_for(lambda: _model_state(pool, "broken") == "failed", 90, "the model marked failed")
        m = pool.model("broken")
        assert "gave up after" in m["failed"] and "load" in m["failed"]
        with Client(pool.frontend, retries=1, timeout=10) as c:
            t0 = time.monotonic()
            with pytest.raises(ModelUnavailable):
                c.infer("broken", mlp_input(1))
            assert time.monotonic() - t0 < 1.0  # a fast, clear error instead of waiting
            assert c.infer("good", mlp_input(1)).outputs[0].shape == (1, 4)
        health = pool.pool_ctl("health")
        assert health.returncode == 1 and "broken: failed" in health.stdout
        spawns = pool.log().count("spawning broken")
        time.sleep(1.0)  # give a storm the chance to show itself
        assert pool.log().count("spawning broken") == spawns
    finally:
        pool.stop()


def _model_state(pool: Pool, name: str) -> str | None:
    try:
        return pool.model(name)["status"]
    except Exception:
        return None


def test_overload_answers_overloaded_and_expires_queued(tmp_path: object) -> None:
    d = str(tmp_path)
    slow = make_factory_model(
        os.path.join(d, "slow"), seed=7, forward="hang", only_if_negative=True
    )
    models = [
        {
            "name": "slow",
            "path": slow,
            "devices": ["cpu"],
            "max_queue": 4,
            "max_batch": 1,
            "request_timeout_s": 1.5,
        }
    ]
    with running_pool(d, models, request_grace_s=30.0) as pool:
        codes: list[str] = []
        lock = threading.Lock()

        def send(x: np.ndarray) -> None:
            with Client(pool.frontend, retries=1, timeout=20) as c:
                try:
                    c.infer("slow", x, timeout=1.5)
                    code = "OK"
                except (Overloaded, DeadlineExceeded) as exc:
                    code = exc.code
                with lock:
                    codes.append(code)

        # One request hangs the only worker, which holds one more (its credit is two
        # batches of max_batch=1); 4 wait in the queue; the remaining 5 overflow.
        blocker = threading.Thread(target=send, args=(negative_input(0),))
        blocker.start()
        wait_for(lambda: pool.model("slow")["workers"][0]["inflight"] == 1, 10, "busy worker")
        threads = [threading.Thread(target=send, args=(mlp_input(1),)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads + [blocker]:
            t.join(30)
        assert codes.count("OVERLOADED") == 5, codes
        assert codes.count("DEADLINE_EXCEEDED") == 6, codes  # blocker, held, 4 queued


def test_sigterm_drains_and_exits_zero(tmp_path: object) -> None:
    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=4)
    pool = start_pool(d, [{"name": "m", "path": m, "devices": ["cpu", "cpu"]}])
    pids = worker_pids(pool, "m")
    # Requests sent after poold has exited cannot be answered by anyone: at most one per
    # client (its last) may time out. Every other one is answered or told SHUTTING_DOWN.
    load = Load(
        pool.frontend,
        "m",
        8,
        check=mlp_check(4),
        timeout=3,
        allowed=frozenset({"SHUTTING_DOWN", "TIMEOUT"}),
    )
    with load:
        load.wait_ok(100)
        pool.proc.send_signal(signal.SIGTERM)
        assert pool.proc.wait(30) == 0
    assert not load.errors, load.errors[:3]
    assert load.allowed_errors.get("TIMEOUT", 0) <= 8, load.allowed_errors
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 5, "workers gone")


def test_sigkill_of_poold_takes_every_worker_with_it(tmp_path: object) -> None:
    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=4)
    pool = start_pool(d, [{"name": "m", "path": m, "devices": ["cpu", "cpu", "cpu"]}])
    try:
        pids = worker_pids(pool, "m") + [pool.status()["spawner_pid"]]
        assert len(pids) == 4
        pool.proc.send_signal(signal.SIGKILL)
        pool.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not any(_alive(p) for p in pids), 5, "orphaned workers to exit")
        assert time.monotonic() - t0 < 2.0
    finally:
        try:
            os.killpg(pool.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ten_times_overload_keeps_memory_bounded(tmp_path: object) -> None:
    """Far more clients than one slow worker can serve, for a while: poold's RSS stays
    bounded, every answer is correct or OVERLOADED/DEADLINE_EXCEEDED, and it recovers."""
    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=4)
    models = [
        {
            "name": "m",
            "path": m,
            "devices": ["cpu"],
            "max_batch": 1,
            "max_queue": 16,
            "request_timeout_s": 0.5,
        }
    ]
    with running_pool(d, models) as pool:
        proc = psutil.Process(pool.proc.pid)
        seconds = float(os.environ.get("GPU_POOL_OVERLOAD_S", "30"))  # issue 4 asks for 30 s
        script = os.path.join(os.path.dirname(__file__), "flood.py")
        floods = [
            subprocess.Popen(
                [sys.executable, script, pool.frontend, "m", str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        rss = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rss.append(proc.memory_info().rss)
            time.sleep(0.5)
        outs = [f.communicate(timeout=60)[0] for f in floods]
        totals: dict[str, int] = {}
        for out in outs:
            for line in out.split():
                code, n = line.split("=")
                totals[code] = totals.get(code, 0) + int(n)
        assert set(totals) <= {"OK", "OVERLOADED", "DEADLINE_EXCEEDED"}, totals
        assert totals.get("OK", 0) > 0 and totals.get("OVERLOADED", 0) > 0, totals
        assert max(rss) - rss[len(rss) // 4] < 64 << 20, [r >> 20 for r in rss]
        with Client(pool.frontend) as c:
            x = mlp_input(1)
            np.testing.assert_allclose(
                c.infer("m", x).outputs[0], mlp_reference(4, x), rtol=1e-5, atol=1e-6
            )
