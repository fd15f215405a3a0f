"""Apply a re-read config (SIGHUP / ``pool-ctl reload``) through the zero-loss paths.

The live state is the truth for versions, the config for topology. Comparing the new
file with the one last applied, per model:

- new in the file: loaded (``started``); removed from it: drained and unloaded
  (``stopped``); unchanged: ``kept``, whatever version pool-ctl put it on since.
- its path or version changed: an upgrade to the file's model (``upgraded``).
- only its devices changed: rescaled on the *live* version (``rescaled``); only worker
  settings (max_batch, threads, ...): fresh workers of the live version
  (``reconfigured``); only router settings (queue, timeouts): applied at once (``kept``).

A reload never reverts a committed version: a model upgraded by pool-ctl keeps that
version when the file changes only its worker count. The result comes when every
operation it started has finished: ``ok`` only if all of them succeeded, with one
outcome per model. A file with problems changes nothing and fails. [pool] settings
need a restart, except that the CURVE authorized keys directory is always re-read
(``pool.curve_keys``): a removed key file is refused from its next connection on; and
so is ``metrics_token_file``: /metrics wants the new token from its next request on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from pool.config import ConfigError, ModelConfig, load_config
from pool.http import read_token_file
from pool.op_result import LoadResult, OpResult
from pool.operations import ModelOp, digest_then, start_operation
from pool.rescale import RescaleResult
from pool.runtime import ModelRuntime
from pool.state import Deployed
from pool.upgrade import Refused, Upgrade
from pool.upgrade_result import UpgradeResult

if TYPE_CHECKING:
    from pool.daemon import Daemon

log = logging.getLogger(__name__)

Done = Callable[[OpResult], None]
ROUTER_KEYS = ("max_queue", "request_timeout_s", "retry_on_worker_loss")
WORKER_KEYS = (
    "max_batch",
    "max_delay_ms",
    "threads",
    "cuda_graphs",
    "max_requests",
    "max_requests_jitter",
    "max_rss_mb",
    "max_gpu_growth_mb",
)


class ModelOutcome(NamedTuple):
    """What a reload did to one model: started, stopped, kept, upgraded, ... or failed."""

    model: str
    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    outcomes: tuple[ModelOutcome, ...] = ()
    notes: tuple[str, ...] = ()
    problems: tuple[str, ...] | None = None  # the file's problems: nothing was changed

    def summary(self) -> str:
        """One line naming what failed, for pool-ctl's error and systemd's STATUS."""
        if self.problems:
            return "config has problems: " + "; ".join(self.problems)
        failed = [o for o in self.outcomes if o.outcome == "failed"]
        return "; ".join(f"{o.model}: {o.detail}" for o in failed) or "ok"

    def to_json(self) -> dict[str, Any]:
        if self.problems is not None:
            return {"ok": self.ok, "problems": list(self.problems), "outcomes": []}
        return {
            "ok": self.ok,
            "outcomes": [o._asdict() for o in self.outcomes],
            "notes": list(self.notes),
        }

    def message(self) -> dict[str, Any]:
        """The control protocol's result for ``pool-ctl reload``."""
        error = "" if self.ok else "reload failed: " + self.summary()
        return {"type": "result", "ok": self.ok, "data": self.to_json(), "error": error}


ReloadDone = Callable[[ReloadResult], None]


class _Batch:
    """Outcomes of one reload; calls ``done`` once the last started operation ends."""

    def __init__(self, done: ReloadDone, notes: list[str]) -> None:
        self.done = done
        self.notes = notes
        self.outcomes: list[ModelOutcome] = []
        self.pending = 1  # held until every operation is started (close)

    def record(self, model: str, outcome: str, detail: str = "") -> None:
        self.outcomes.append(ModelOutcome(model, outcome, detail))

    def start(self, model: str, success: str, begin: Callable[[Done], None]) -> None:
        self.pending += 1

        def finished(result: OpResult) -> None:
            if result.ok:
                self.record(model, success, _detail(result))
            else:
                self.record(model, "failed", result.reason)
            self._release()

        try:
            begin(finished)
        except (Refused, ConfigError, OSError) as exc:
            self.pending -= 1
            self.record(model, "failed", str(exc))

    def close(self) -> None:
        self._release()

    def _release(self) -> None:
        self.pending -= 1
        if self.pending == 0:
            ok = not any(o.outcome == "failed" for o in self.outcomes)
            outcomes = tuple(sorted(self.outcomes, key=lambda o: o.model))
            log.log(
                logging.INFO if ok else logging.ERROR,
                "reload %s: %s",
                "done" if ok else "failed",
                "; ".join(f"{o.model} {o.outcome}" for o in outcomes) or "no changes",
            )
            self.done(ReloadResult(ok, outcomes, tuple(self.notes)))


def _detail(result: OpResult) -> str:
    """"version V on D, ..." for what serves after a model's operation."""
    version: str | None = None
    devices: tuple[str, ...] = ()
    if isinstance(result, UpgradeResult):
        version, devices = result.to_version, result.devices or ()
    elif isinstance(result, (RescaleResult, LoadResult)):
        version, devices = result.version, result.devices
    return f"version {version} on {', '.join(devices)}" if version else ""


def _reload_metrics_token(d: Daemon, batch: _Batch, notes: list[str]) -> None:
    """Re-read pool.metrics_token_file, as the CURVE keys are: a leaked token is revoked by
    writing a new one and reloading. A file that cannot be read keeps the old token."""
    path = d.pool.metrics_token_file
    http = getattr(d, "http", None)
    if not path or http is None:
        return
    try:
        token = read_token_file(path)
    except ValueError as exc:
        batch.record("metrics_token_file", "failed", f"{exc}; old token kept")
        return
    http.set_token(token)
    notes.append("metrics token re-read")


def apply_reload(d: Daemon, done: ReloadDone) -> None:
    if d.config.source is None:
        done(ReloadResult(True, notes=("no config file (demo): nothing to reload",)))
        return
    try:
        new = load_config(d.config.source)
    except ConfigError as exc:
        log.error("reload refused, config has problems: %s", "; ".join(exc.problems))
        done(ReloadResult(False, problems=tuple(exc.problems)))
        return
    notes = []
    if new.pool != d.config.pool:
        notes.append("[pool] settings changed: restart poold to apply them")
    batch = _Batch(done, notes)
    keys = getattr(d, "curve_keys", None)  # set when CURVE is on
    if keys is not None:
        change = keys.reload()
        if change.problem:
            batch.record("curve_authorized_keys", "failed", change.problem + "; old keys kept")
        else:
            notes.append(
                f"CURVE keys: {change.admitted} admitted ({change.added} added, "
                f"{change.removed} removed; existing connections stay up)"
            )
    _reload_metrics_token(d, batch, notes)
    old = {m.name: m for m in d.config.models}
    fresh = {m.name: m for m in new.models}
    d.config = new
    m = d.manager
    for name, cfg in fresh.items():
        rt = d.sup.models.get(name)
        if name in old and cfg == old[name]:
            batch.record(name, "kept")
            continue
        d.topology.forget(name)  # a newer intent than whatever pool-ctl recorded for it
        if rt is None:
            batch.start(name, "started", _bind(m.load, cfg, persist=False))
        elif rt.busy:
            batch.record(name, "failed", f"{rt.busy} running; reload again when it ends")
        else:
            _change(d, batch, old.get(name) or rt.cfg, cfg)
    for name in old.keys() - fresh.keys():
        rt = d.sup.models.get(name)
        d.topology.forget(name)
        if rt is not None:
            batch.start(name, "stopped", _bind(m.unload, rt, persist=False))
    batch.close()


def _change(d: Daemon, batch: _Batch, before: ModelConfig, after: ModelConfig) -> None:
    rt = d.sup.models[after.name]
    m = d.manager
    rt.cfg = after
    rt.route.max_queue = after.max_queue
    rt.route.timeout_s = after.request_timeout_s
    rt.route.retry = after.retry_on_worker_loss
    d.sup.activate(rt)  # pushes the router settings now
    devices = tuple(after.devices or rt.devices)
    if (before.path, before.version) != (after.path, after.version):
        strategy = "surge" if devices != tuple(rt.devices) else "auto"
        batch.start(after.name, "upgraded", lambda f: _upgrade(d, rt, after, devices, strategy, f))
        return
    if devices != tuple(rt.devices):
        batch.start(after.name, "rescaled", lambda f: m.scale(rt, devices, f, persist=False))
        return
    if any(getattr(before, k) != getattr(after, k) for k in WORKER_KEYS):
        batch.start(
            after.name,
            "reconfigured",
            lambda f: m.scale(rt, devices, f, persist=False, action="reconfigure"),
        )
        return
    changed = [k for k in ROUTER_KEYS if getattr(before, k) != getattr(after, k)]
    batch.record(after.name, "kept", "applied " + ", ".join(changed) if changed else "")


def _upgrade(
    d: Daemon,
    rt: ModelRuntime,
    after: ModelConfig,
    devices: tuple[str, ...],
    strategy: str,
    done: Done,
) -> None:
    sup = d.sup
    path = os.path.realpath(after.path)

    def op() -> ModelOp:
        digest = yield from digest_then(sup, path)
        target = Deployed(after.version or digest.split(":")[1][:12], path, digest)
        before = rt.devices
        rt.devices = devices
        up = Upgrade(sup, rt, target, strategy, sup.pool.upgrade_timeout_s, "upgrade", _quiet)
        result = yield from up.run()
        if result.ok:
            rt.state.config_path = after.path
            sup.ports.store.save(rt.state)
        else:
            rt.devices = before
        return dataclasses.replace(result, devices=tuple(rt.devices))

    start_operation(sup, rt, "upgrade", op(), done)


def _quiet(*_: Any, **__: Any) -> None:
    pass


def _bind(fn: Callable[..., None], what: Any, **kw: Any) -> Callable[[Done], None]:
    """``fn(what, done, **kw)`` once the batch hands over its ``done``."""

    def begin(done: Done) -> None:
        fn(what, done, **kw)

    return begin
