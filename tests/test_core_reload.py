"""A config reload through the real core: ``pool.reload`` and ``pool.manage`` on the real
supervisor, with a fake clock, fake queues and fake workers (tests/opskit.py).

One reload adds a model (loaded), changes one (upgraded to the file's new path) and
removes one (its queue served before its worker is told to stop, then forgotten by the
router and the supervisor), its draining worker sending heartbeats all along; another
changes only the devices (rescaled on the live version, the kept worker kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corekit import Core
from opskit import World

from pool.commands import RemoveRoute, SendControl
from pool.config import Config, ModelConfig, load_config
from pool.events import WorkerMessage
from pool.lifecycle import WorkerState
from pool.manage import Manager
from pool.metrics import PoolMetrics
from pool.model_lifecycle import ModelStatus
from pool.reload import ReloadResult, apply_reload
from pool.state import Deployed
from pool.topology import Topology
from pool.worker_wire import decode


class Daemon:
    """The part of ``pool.daemon.Daemon`` a reload and the manager use."""

    def __init__(self, core: Core, config: Config) -> None:
        self.sup = core.sup
        self.config = config
        self.pool = config.pool
        self.metrics = PoolMetrics()
        self.store = core.store
        self.topology = Topology(config.pool.state_dir)
        self.roots = tuple(core.sup.roots)
        self.manager = Manager(self)  # type: ignore[arg-type]

    def add_model(self, cfg: ModelConfig) -> None:
        version = cfg.version or "1"
        deployed = Deployed(version, cfg.path, f"digest-{cfg.name}-{version}")
        self.sup.add_model(cfg, cfg.devices or ("cpu",), deployed, self.store.load(cfg.name))


def toml(models: list[dict[str, Any]], state_dir: Path) -> str:
    lines = ["[pool]", f'state_dir = "{state_dir}"', "standby = false", "watch_requests = 0"]
    for m in models:
        lines.append("[[models]]")
        for key, value in m.items():
            if isinstance(value, list):
                lines.append(f"{key} = [{', '.join(repr(v) for v in value)}]".replace("'", '"'))
            else:
                lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


def reloaded(w: World, d: Daemon) -> ReloadResult:
    results: list[ReloadResult] = []
    apply_reload(d, results.append)  # type: ignore[arg-type]
    w.run_until(lambda: results)
    return results[0]


def setup(tmp_path: Path, first: list[dict[str, Any]]) -> tuple[World, Daemon, Path]:
    for name in ("m", "m2", "k", "n"):
        (tmp_path / f"{name}.pt").write_bytes(name.encode() * 64)
    cfg_path = tmp_path / "pool.toml"
    cfg_path.write_text(toml(first, tmp_path))
    config = load_config(str(cfg_path))
    core = Core(tmp_path, watch_requests=0)
    core.model = next(m for m in config.models if m.name == "m")
    d = Daemon(core, config)
    for cfg in config.models:
        if cfg.name != "m":
            d.add_model(cfg)
    w = World(core)
    w.take(core.answer(core.sup.take_commands()))
    w.run_until(lambda: all(w.core.sup.models[name].serving_gen for name in w.core.sup.models))
    w.run_until(lambda: all(r.state is WorkerState.READY for r in all_workers(w)))
    return w, d, cfg_path


def all_workers(w: World) -> list[Any]:
    return [r for rt in w.core.sup.models.values() for r in rt.workers]


def test_a_reload_adds_changes_and_removes_models(tmp_path: Path) -> None:
    m = {"name": "m", "path": tmp_path / "m.pt", "version": "1", "devices": ["cpu"]}
    k = {"name": "k", "path": tmp_path / "k.pt", "version": "1", "devices": ["cpu"]}
    w, d, cfg_path = setup(tmp_path, [m, k])
    sup = w.core.sup
    # The file that SIGHUP re-reads: m on a new path, k gone, n new.
    n = {"name": "n", "path": tmp_path / "n.pt", "devices": ["cpu"]}
    m2 = {**m, "path": tmp_path / "m2.pt", "version": "2"}
    cfg_path.write_text(toml([m2, n], tmp_path))
    (k_worker,) = sup.models["k"].workers
    w.core.queues.waiting["k"] = 3  # queued for k as the reload starts
    turn = w.turn
    stopped_with_queue: list[int] = []

    def busy_turn() -> None:
        turn()
        if "k" in sup.models and sup.models["k"].removing:
            # The router serves k's queue, one request a turn; k's draining worker keeps
            # sending heartbeats (once the cause of a KeyError that killed poold).
            w.core.queues.waiting["k"] = max(0, w.core.queues.waiting.get("k", 0) - 1)
        if k_worker.alive and k_worker.pid is not None:
            hb = {"t": "hb", "rss": 1 << 20, "served": 1, "model_errors": 0, "batches": []}
            w.feed(WorkerMessage(k_worker.slot_view.wid, decode(hb), w.core.now))
        told = [c for c in w.commands[-20:] if isinstance(c, SendControl)]
        if any(c.wid == k_worker.slot_view.wid for c in told):
            stopped_with_queue.append(w.core.queues.queue_len("k"))

    w.turn = busy_turn  # type: ignore[method-assign]
    result = reloaded(w, d)
    assert result.ok, result.summary()
    outcomes = {o.model: o.outcome for o in result.outcomes}
    assert outcomes == {"k": "stopped", "m": "upgraded", "n": "started"}
    # k: its queue was served before its worker was told to stop, then it was forgotten.
    assert stopped_with_queue and set(stopped_with_queue) == {0}
    assert w.core.queues.failed == [("k", "MODEL_UNAVAILABLE", 0)]
    assert "k" not in sup.models and not k_worker.alive
    assert any(isinstance(c, RemoveRoute) and c.model == "k" for c in w.commands)
    # m: upgraded to the file's path; n: loaded and serving.
    rt_m, rt_n = sup.models["m"], sup.models["n"]
    assert rt_m.deployed is not None and rt_m.deployed.path == str(tmp_path / "m2.pt")
    assert [r.version for r in rt_m.workers] == ["2"]
    assert [r.state for r in rt_n.workers] == [WorkerState.READY]
    assert rt_n.status() is ModelStatus.SERVING and rt_m.status() is ModelStatus.SERVING


def test_a_reload_that_changes_only_devices_rescales_the_live_version(tmp_path: Path) -> None:
    m = {"name": "m", "path": tmp_path / "m.pt", "version": "1", "devices": ["cpu"]}
    w, d, cfg_path = setup(tmp_path, [m])
    (kept,) = w.core.rt.workers
    cfg_path.write_text(toml([{**m, "devices": ["cpu", "cpu"]}], tmp_path))
    result = reloaded(w, d)
    assert result.ok and {o.model: o.outcome for o in result.outcomes} == {"m": "rescaled"}
    rt = w.core.rt
    assert rt.devices == ("cpu", "cpu") and kept.alive and kept in rt.workers
    assert sorted(r.slot for r in rt.workers) == [0, 1]
    assert all(r.state is WorkerState.READY and r.version == "1" for r in rt.workers)
