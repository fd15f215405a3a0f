"""Starting operations on a model: one at a time, hashing off the loop, recycling."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator

from pool.lifecycle import WorkerRecord
from pool.op_result import OpResult
from pool.runtime import ModelRuntime
from pool.supervisor import Supervisor
from pool.tasks import Wait
from pool.upgrade import Refused, Upgrade
from pool.upgrade_phases import UpgradePhase

log = logging.getLogger(__name__)

# An operation on one model: a generator the scheduler drives, ending with its result.
ModelOp = Generator[Wait, bool, OpResult]

PROGRESS_EVERY_S = 0.25


def digest_then(
    sup: Supervisor,
    path: str,
    progress: Callable[..., None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Generator[Wait, bool, str]:
    """Hash a model file on a thread so a big file never stalls routing; with
    ``progress``, report ``hashing`` with bytes done and total while it runs. ``stop``
    (a cancel) ends the wait at once: "" then (the hash finishes on its thread unused)."""
    done = [0]
    fut = sup.ports.files.digest(path, done)
    total = sup.ports.files.size(path) if progress is not None else 0
    t0 = sup.now
    end = t0 + 600.0
    every = PROGRESS_EVERY_S if progress is not None else 600.0
    while not fut.done() and sup.now < end:
        yield Wait(lambda: fut.done() or stop(), every, "digest")
        if stop() and not fut.done():
            return ""
        if progress is not None and not fut.done():
            elapsed = round(sup.now - t0, 3)
            progress("hashing", bytes=done[0], total=total, elapsed_s=elapsed)
    return fut.result()


def start_operation(
    sup: Supervisor,
    rt: ModelRuntime,
    name: str,
    op: ModelOp,
    done: Callable[[OpResult], None],
) -> None:
    if rt.busy is not None:
        raise Refused(f"{rt.busy} of model {rt.name!r} is already running; try again when it ends")
    rt.begin(name)

    def finished(result: OpResult) -> None:  # the scheduler's OpCrashed, if op raised
        rt.end()
        sup.prune_generations(rt)
        sup.activate(rt)  # workers that became ready meanwhile join the table
        sup.refill(rt)  # a serving worker that died during the operation is replaced now
        done(result)

    sup.scheduler.start(f"{name}:{rt.name}", op, finished)


def start_recycle(sup: Supervisor, rt: ModelRuntime, rec: WorkerRecord, why: str) -> None:
    """Replace one worker with a fresh one of the same version, through the zero-loss path."""
    log.info("recycling %s [pid %s]: %s", rec.wid, rec.pid, why, extra={"model": rt.name})

    def op() -> ModelOp:
        up = Upgrade(
            sup,
            rt,
            rt.gens[rec.generation],
            "surge",
            sup.pool.upgrade_timeout_s,
            "recycle",
            lambda *a, **k: None,
        )
        up.enter(UpgradePhase.STARTING)
        new = up.spawn(rec.generation, rec.slot)
        ok, reason = yield from up.wait_boot([new])
        if not ok:
            yield from up.abandon([new])
            return up.finish(False, reason)
        sup.activate(rt)
        rec.exit_reason = "recycled"
        up.enter(UpgradePhase.RETIRING)
        yield from up.retire([rec])
        return up.finish(True, "")

    try:
        start_operation(sup, rt, "recycle", op(), lambda r: None)
    except Refused:
        pass
