"""Runtime model management: load, unload and rescale models, each a zero-loss operation.

load    start a model's workers; it joins routing when the first is ready. If a worker
        cannot boot the model is taken out again and the command fails (exit 1).
unload  new requests get MODEL_UNAVAILABLE at once; what is queued is served; workers
        drain, stop and are reaped; then the model is gone from status, metrics, health.
scale   the live version (never the config's) on the new device list: workers whose
        device stays are kept (same pid), only the added ones start (joining routing
        once warmed up) and only the removed ones drain and stop (``pool.rescale``).

Every outcome is written to ``topology.json`` (:mod:`pool.topology`), so a restart comes
back to the same pool. ``pool.reload`` uses the same operations for config edits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from pool.commands import RemoveRoute
from pool.config import ConfigError, ModelConfig
from pool.lifecycle import WorkerState
from pool.load_progress import LoadingReport
from pool.op_result import LoadResult, OpFailed, OpResult, UnloadResult
from pool.operations import ModelOp, digest_then, start_operation
from pool.rescale import Rescale
from pool.runtime import ModelRuntime
from pool.stopping import KILL_GRACE_S
from pool.supervisor import Supervisor
from pool.tasks import Wait
from pool.upgrade import Refused, Upgrade

if TYPE_CHECKING:
    from pool.daemon import Daemon

log = logging.getLogger(__name__)

Done = Callable[[OpResult], None]
# How often an unload asks the router whether its model's queue is served: a sampled
# wait (pool.tasks.Wait.every_s), not a question every loop turn.
QUEUE_EVERY_S = 0.005
Progress = Callable[..., None]


def _quiet(*_: Any, **__: Any) -> None:
    pass


class Manager:
    """The operations above, bound to one daemon."""

    def __init__(self, d: Daemon) -> None:
        self.d = d

    @property
    def sup(self) -> Supervisor:
        return self.d.sup

    def model_config(self, entry: dict[str, Any]) -> ModelConfig:
        """Check a request with the config file's own checks (ConfigError lists them all)."""
        from pool.config import _load_models  # the config's validation, one entry at a time

        problems: list[str] = []
        models = _load_models([entry], "/", tuple(self.d.roots), problems)
        if problems or not models:
            raise ConfigError([p.replace("models[0].", "") for p in problems] or ["invalid"])
        return models[0]

    # ------------------------------------------------------------------ load
    def load(
        self, cfg: ModelConfig, done: Done, progress: Progress = _quiet, persist: bool = True
    ) -> None:
        """``persist=False`` for a model the config file names (a reload): the file is
        its record, topology.json only holds what pool-ctl changed."""
        if cfg.name in self.sup.models:
            raise Refused(f"model {cfg.name!r} is already loaded (unload it, or upgrade it)")
        sup = self.sup
        t0 = sup.now
        made: list[ModelRuntime] = []  # the runtime this load created, once it exists

        def op() -> ModelOp:
            progress("digest", path=cfg.path)
            yield from digest_then(sup, cfg.path, progress)  # off the loop; add_model reuses it
            if cfg.name in sup.models:
                return OpFailed(cfg.name, "loaded meanwhile", outcome=None)
            self.d.add_model(cfg)
            rt: ModelRuntime = sup.models[cfg.name]
            rt.begin("load")  # like any operation: no restarts, no recycling meanwhile
            made.append(rt)
            workers = list(rt.workers)
            progress("starting", devices=list(rt.devices), pids=[w.pid for w in workers])
            limit = sup.pool.boot_timeout_s + 5

            def settled() -> bool:
                return all(w.state is WorkerState.READY or not w.booting for w in workers)

            def say(phase: str, **info: Any) -> None:
                progress(phase, elapsed_s=round(sup.now - t0, 3), **info)

            loading = LoadingReport(workers)
            end = sup.now + limit
            while not settled() and sup.now < end:
                # Wakes as the workers load, to forward their bytes (a bar in pool-ctl).
                yield Wait(lambda: settled() or loading.moved(), end - sup.now, "boot")
                loading.say(say)
            bad = [w for w in workers if w.state is not WorkerState.READY]
            if bad:
                reason = f"{bad[0].wid}: {bad[0].failure or bad[0].state.value}"
                yield from self._drain_out(rt, fail_queue=True)
                return OpFailed(cfg.name, reason)
            dep = rt.deployed
            return LoadResult(
                model=cfg.name,
                version=dep.version if dep else None,
                devices=tuple(rt.devices),
                pids_started=tuple(w.pid for w in workers),
                elapsed_s=sup.now - t0,
            )

        def finished(result: OpResult) -> None:  # the scheduler's OpCrashed, if op raised
            for rt in made:
                rt.end()
                if result.ok:
                    sup.refill(rt)
                else:
                    self._forget(cfg.name)
            if isinstance(result, LoadResult):
                if persist:
                    self.d.topology.loaded(cfg)
                log.info(
                    "loaded %s version %s on %s",
                    cfg.name,
                    result.version,
                    ", ".join(result.devices),
                    extra={"model": cfg.name},
                )
            else:
                log.error(
                    "load of %s failed: %s", cfg.name, result.reason, extra={"model": cfg.name}
                )
            done(result)

        sup.scheduler.start(f"load:{cfg.name}", op(), finished)

    # ---------------------------------------------------------------- unload
    def unload(
        self, rt: ModelRuntime, done: Done, progress: Progress = _quiet, persist: bool = True
    ) -> None:
        sup = self.sup
        t0 = sup.now

        def op() -> ModelOp:
            pids = [w.pid for w in rt.alive()]
            progress("draining", queued=sup.ports.queues.queue_len(rt.name), pids=pids)
            lost = yield from self._drain_out(rt, fail_queue=False)
            return UnloadResult(rt.name, tuple(pids), lost, sup.now - t0)

        def finished(result: OpResult) -> None:
            if isinstance(result, UnloadResult):
                self._forget(rt.name)
                if persist:
                    self.d.topology.unloaded(rt.name)
                log.info(
                    "unloaded %s: %d worker(s) drained and stopped",
                    rt.name,
                    len(result.pids_stopped),
                    extra={"model": rt.name},
                )
            done(result)

        start_operation(self.sup, rt, "unload", op(), finished)

    def _drain_out(self, rt: ModelRuntime, fail_queue: bool) -> Generator[Wait, bool, int]:
        """Refuse new requests, serve the queue, drain and reap every worker."""
        sup = self.sup
        queues = sup.ports.queues
        rt.unload()
        rt.restarts.clear()
        rt.route.unavailable = f"model {rt.name!r} is being unloaded"
        sup.activate(rt)  # pushes the route: new requests are answered at once
        if not fail_queue:
            served = lambda: queues.queue_len(rt.name) == 0  # noqa: E731
            yield Wait(served, sup.pool.drain_timeout_s, "queue", every_s=QUEUE_EVERY_S)
        lost = queues.fail_queued(rt.name, "MODEL_UNAVAILABLE", rt.route.unavailable)
        recs = rt.alive()
        for rec in recs:
            sup.retire(rec)
        pool = sup.pool
        limit = pool.drain_timeout_s + pool.stop_timeout_s + 3 * KILL_GRACE_S + 5
        yield Wait(lambda: not any(r.alive for r in recs), limit, "exit")
        return lost

    def _forget(self, name: str) -> None:
        """The model's last trace: routing table, supervisor, metrics series."""
        rt = self.sup.models.pop(name, None)
        if rt is None:
            return
        self.sup.emit(RemoveRoute(name))  # after the commands decided before it
        self.d.metrics.forget_model(name)

    # ----------------------------------------------------------------- scale
    def scale(
        self,
        rt: ModelRuntime,
        devices: tuple[str, ...],
        done: Done,
        progress: Progress = _quiet,
        persist: bool = True,
        action: str = "scale",
    ) -> None:
        """The live version on ``devices``: ``scale`` keeps the workers whose device
        stays (``pool.rescale``); ``reconfigure`` (worker settings a config edit changed)
        replaces every worker with a fresh one of the live version, a surge."""
        dep = rt.deployed
        if dep is None:
            raise Refused(f"model {rt.name!r} has no serving version to scale")
        before = rt.devices
        sup = self.sup

        def op() -> ModelOp:
            if action == "scale":
                rescaled = yield from Rescale(
                    sup, rt, devices, sup.pool.upgrade_timeout_s, progress
                ).run()
                return rescaled
            rt.devices = devices
            up = Upgrade(sup, rt, dep, "surge", sup.pool.upgrade_timeout_s, action, progress)
            result = yield from up.run()
            if not result.ok:
                rt.devices = before  # refill() below must fill the old slots again
            return dataclasses.replace(result, devices=tuple(rt.devices))

        def finished(result: OpResult) -> None:
            if result.ok and persist:
                self.d.topology.scaled(rt.name, devices)
            done(result)

        start_operation(sup, rt, action, op(), finished)
