"""The supervisor's decisions, in-process: a real Supervisor over fake router, spawner,
NVML and metrics, time given to ``tick`` (no worker process, no socket, no sleep).

Covers the worker lifecycle from spawn to ready, every stop stage (control message,
SIGTERM, SIGKILL, the reap that never came), a hung worker (SIGABRT first), restart
back-off after crashes up to giving up, and a heartbeat from a worker being retired.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from pool.config import Config, ModelConfig, PoolConfig
from pool.lifecycle import WorkerRecord, WorkerState
from pool.model_lifecycle import TRANSITIONS, ModelStatus
from pool.state import Deployed, StateStore
from pool.stopping import KILL_GRACE_S
from pool.supervisor import Supervisor

NO_SUCH_PID = 2**22 + 12345  # above pid_max on any Linux: never a live process


class FakeRouter:
    lane = ""

    def __init__(self) -> None:
        self.active: dict[str, list[bytes]] = {}
        self.controls: list[tuple[bytes, dict[str, Any]]] = []
        self.removed: list[bytes] = []

    def add_route(self, route: Any) -> None:
        pass

    def add_worker(self, slot: Any) -> None:
        pass

    def activate(self, model: str, generation: int, slots: list[Any]) -> None:
        self.active[model] = [s.wid for s in slots]

    def deactivate(self, slot: Any) -> None:
        for wids in self.active.values():
            if slot.wid in wids:
                wids.remove(slot.wid)

    def remove_worker(self, wid: bytes, *, lost: bool) -> int:
        self.removed.append(wid)
        return 0

    def send_control(self, wid: bytes, message: bytes) -> bool:
        self.controls.append((wid, msgpack.unpackb(message)))
        return True

    def fail_queued(self, model: str, code: str, message: str) -> int:
        return 0


class FakeSpawner:
    def __init__(self) -> None:
        self.specs: list[dict[str, Any]] = []

    def spawn(self, spec: dict[str, Any]) -> int:
        self.specs.append(spec)
        return len(self.specs)

    def standby(self, spec: dict[str, Any]) -> int:  # pragma: no cover - CPU: never asked
        raise AssertionError("no standby on a CPU device")


class FakeGpu:
    def memory(self, idx: int) -> None:
        return None

    def process_bytes(self, idx: int) -> None:
        return None


class FakeMetrics:
    def __init__(self) -> None:
        self.exits: list[str] = []

    def observe_worker_exit(self, model: str, reason: str) -> None:
        self.exits.append(reason)

    def observe_batch(self, model: str, size: int, n: int) -> None:
        pass


@pytest.fixture
def sup(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Supervisor]:
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "killpg", lambda pid, sig: signals.append((pid, sig)))
    pool = PoolConfig(state_dir=str(tmp_path), standby=False)
    model = ModelConfig(name="m", path=str(tmp_path / "m.pt"), devices=("cpu",))
    config = Config(pool=pool, models=(model,), source=None)
    s = Supervisor(
        config,
        FakeRouter(),  # type: ignore[arg-type]
        FakeSpawner(),  # type: ignore[arg-type]
        StateStore(str(tmp_path)),
        FakeGpu(),  # type: ignore[arg-type]
        FakeMetrics(),  # type: ignore[arg-type]
        "ipc://unused",
        -1,
    )
    s.signals = signals  # type: ignore[attr-defined]
    s.add_model(model, model.devices, Deployed("1", model.path, "d1"))
    yield s


def spawned(sup: Supervisor, pid: int = NO_SUCH_PID) -> WorkerRecord:
    """The newest worker: the spawner says its pid."""
    token = max(sup.by_token)
    rec = sup.by_token[token]
    sup.on_spawned(token, pid)
    return rec


def booted(sup: Supervisor, pid: int = NO_SUCH_PID) -> WorkerRecord:
    rec = spawned(sup, pid)
    wid = rec.slot_view.wid
    for event in ({"t": "hello", "pid": pid}, {"t": "phase", "phase": "warming"}):
        sup.on_worker_event(wid, event)
    sup.on_worker_event(wid, {"t": "ready", "timings": {"load_s": 0.1}})
    return rec


def test_a_worker_goes_spawning_starting_loading_warming_ready_and_is_routed(
    sup: Supervisor,
) -> None:
    rec = sup.by_token[max(sup.by_token)]
    assert rec.state is WorkerState.SPAWNING
    sup.on_spawned(max(sup.by_token), NO_SUCH_PID)
    assert rec.state is WorkerState.STARTING
    wid = rec.slot_view.wid
    sup.on_worker_event(wid, {"t": "hello", "pid": NO_SUCH_PID})
    assert rec.state is WorkerState.LOADING
    sup.on_worker_event(wid, {"t": "phase", "phase": "warming"})
    assert rec.state is WorkerState.WARMING
    sup.on_worker_event(wid, {"t": "phase", "phase": "validating"})
    assert rec.state is WorkerState.VALIDATING
    sup.on_worker_event(wid, {"t": "ready", "timings": {}})
    assert rec.state is WorkerState.READY
    assert sup.router.active["m"] == [wid]  # type: ignore[attr-defined]


def test_every_stop_stage_in_order(sup: Supervisor) -> None:
    rec = booted(sup)
    now = time.monotonic()
    sup.retire(rec)
    assert rec.state is WorkerState.DRAINING and sup.router.active["m"] == []  # type: ignore[attr-defined]
    sup.tick(now)  # holds nothing: stop it
    assert rec.state is WorkerState.STOPPING and rec.stop_stage == 1
    assert sup.router.controls == [(rec.slot_view.wid, {"t": "stop"})]  # type: ignore[attr-defined]
    sup.tick(now + sup.pool.stop_timeout_s / 2)
    assert sup.signals == []  # type: ignore[attr-defined]  # still within the polite stage
    now += sup.pool.stop_timeout_s + 0.1
    sup.tick(now)
    assert rec.stop_stage == 2 and sup.signals == [(NO_SUCH_PID, signal.SIGTERM)]  # type: ignore[attr-defined]
    now += KILL_GRACE_S + 0.1
    sup.tick(now)
    assert rec.stop_stage == 3 and sup.signals[-1] == (NO_SUCH_PID, signal.SIGKILL)  # type: ignore[attr-defined]
    assert rec.alive  # SIGKILL sent; the reap has not come
    sup.tick(now + KILL_GRACE_S + 0.1)  # and never will: the pid is gone
    assert rec.state is WorkerState.EXITED and not rec.alive
    assert sup.metrics.exits == ["retired"]  # type: ignore[attr-defined]


def test_a_hung_worker_gets_sigabrt_then_sigkill(sup: Supervisor) -> None:
    rec = booted(sup)
    late = rec.last_heartbeat + sup.pool.heartbeat_timeout_s + 0.1
    sup.tick(late)
    assert rec.state is WorkerState.STOPPING and rec.stop_stage == 2
    assert sup.signals == [(NO_SUCH_PID, signal.SIGABRT)]  # type: ignore[attr-defined]
    assert rec.failure is not None and "no heartbeat" in rec.failure
    sup.tick(late + KILL_GRACE_S + 0.1)
    assert sup.signals[-1] == (NO_SUCH_PID, signal.SIGKILL)  # type: ignore[attr-defined]


def test_crashes_restart_with_growing_back_off_then_give_up(sup: Supervisor) -> None:
    rt = sup.models["m"]
    delays = []
    for crash in range(rt.flap.attempts):
        rec = booted(sup, pid=NO_SUCH_PID + crash)
        before = time.monotonic()
        sup.on_exited(rec.pid or 0, signal.SIGSEGV)  # a signal: no reason to wait for
        assert rec.state is WorkerState.EXITED
        if rt.failed:
            break
        ((when, slot),) = rt.restarts
        delays.append(when - before)
        spawns = len(sup.by_token)
        sup.tick(when - 0.05)
        assert len(sup.by_token) == spawns  # not yet
        sup.tick(when + 0.01)
        assert len(sup.by_token) == spawns + 1 and not rt.restarts  # restarted on slot 0
        rt.flap.reset = lambda: None  # type: ignore[method-assign]  # the next ready resets it
    assert rt.failed is not None and "gave up" in rt.failed
    assert len(delays) == rt.flap.attempts - 1
    assert all(b > a for a, b in zip(delays, delays[1:], strict=False)), delays


def test_a_heartbeat_from_a_retiring_worker_changes_nothing(sup: Supervisor) -> None:
    rt = sup.models["m"]
    recycled: list[str] = []
    sup.recycle = lambda rt, rec, why: recycled.append(why)
    rec = booted(sup)
    rec.recycle_after = 1
    rec.slot_view.final_served = 5  # past max_requests: a READY worker would be recycled
    sup.on_worker_event(rec.slot_view.wid, {"t": "hb"})
    assert recycled == ["served 5 requests (max_requests)"]  # the check can fire at all
    recycled.clear()
    sup.retire(rec)
    sup.on_worker_event(rec.slot_view.wid, {"t": "hb", "rss": 1 << 20, "batches": [[1, 2]]})
    assert rec.state is WorkerState.DRAINING and recycled == [] and rt.busy is None
    assert rec.rss == 1 << 20


def test_the_model_status_moves_only_along_its_table(sup: Supervisor) -> None:
    rt = sup.models["m"]
    seen = [rt.status()]

    def look() -> None:
        now = rt.status()
        if now is not seen[-1]:
            assert now in TRANSITIONS[seen[-1]], (seen[-1], now)
            seen.append(now)

    rt.flap.reset = lambda: None  # type: ignore[method-assign]  # count every crash
    for crash in range(rt.flap.attempts):
        rec = booted(sup, pid=NO_SUCH_PID + crash)
        look()
        sup.on_exited(rec.pid or 0, signal.SIGSEGV)
        look()
        for when, _ in list(rt.restarts):
            sup.tick(when + 0.01)
            look()
    assert rt.failed is not None
    rt.busy = "upgrade"  # what start_operation does, then the operation clears the mark
    sup.clear_failed(rt)
    look()
    rt.busy = None
    look()
    rt.removing = True
    look()
    assert seen == [
        ModelStatus.STARTING,
        ModelStatus.SERVING,
        ModelStatus.STARTING,
        ModelStatus.SERVING,
        ModelStatus.STARTING,
        ModelStatus.SERVING,
        ModelStatus.STARTING,
        ModelStatus.SERVING,
        ModelStatus.STARTING,
        ModelStatus.SERVING,
        ModelStatus.FAILED,
        ModelStatus.UPGRADING,
        ModelStatus.STARTING,
        ModelStatus.UNLOADING,
    ], seen
