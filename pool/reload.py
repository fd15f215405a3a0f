"""Apply a re-read config (SIGHUP / ``pool-ctl reload``) through the zero-loss paths.

New model: start it. Removed model: answer its queue, drain its workers. Changed path,
version, devices or worker settings: an upgrade (surge when devices change, since slots
no longer line up one to one; auto otherwise). [pool] settings need a restart.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from pool.config import ConfigError, load_config
from pool.operations import start_operation
from pool.state import Deployed, file_digest
from pool.upgrade import Refused, Upgrade

if TYPE_CHECKING:
    from pool.daemon import Daemon

log = logging.getLogger(__name__)


def apply_reload(d: Daemon) -> dict[str, Any]:
    if d.config.source is None:
        return {"ok": True, "changes": [], "note": "no config file (demo): nothing to reload"}
    try:
        new = load_config(d.config.source)
    except ConfigError as exc:
        log.error("reload refused, config has problems: %s", "; ".join(exc.problems))
        return {"ok": False, "problems": exc.problems}
    changes: list[str] = []
    old = {m.name: m for m in d.config.models}
    fresh = {m.name: m for m in new.models}
    for name, m in fresh.items():
        if name not in old:
            d.add_model(m)
            changes.append(f"added {name}")
        elif m != old[name]:
            changes.append(_change(d, old[name], m))
    for name in old.keys() - fresh.keys():
        rt = d.sup.models.pop(name, None)
        if rt is None:
            continue
        d.router.fail_queued(name, "MODEL_UNAVAILABLE", f"model {name!r} was removed")
        d.router.remove_route(name)
        for rec in rt.alive():
            d.sup.retire(rec)
            d.sup.models.setdefault(f"~removed~{name}", rt)  # keep ticking until it exits
        changes.append(f"removed {name}")
    if new.pool != d.config.pool:
        changes.append("[pool] settings changed: restart poold to apply them")
    d.config = new
    log.info("reload: %s", "; ".join(changes) or "no changes")
    return {"ok": True, "changes": changes}


def _change(d: Daemon, before: Any, after: Any) -> str:
    rt = d.sup.models[after.name]
    devices = after.devices or rt.devices
    strategy = "surge" if tuple(devices) != tuple(rt.devices) else "auto"
    rt.cfg = after
    rt.devices = tuple(devices)
    rt.route.max_queue = after.max_queue
    rt.route.timeout_s = after.request_timeout_s
    rt.route.retry = after.retry_on_worker_loss
    path = os.path.realpath(after.path)
    digest = file_digest(path)
    target = Deployed(after.version or digest.split(":")[1][:12], path, digest)
    up = Upgrade(
        d.sup, rt, target, strategy, d.pool.upgrade_timeout_s, "upgrade", lambda *a, **k: None
    )
    try:
        start_operation(d.sup, rt, "upgrade", up.run(), lambda result: None)
    except Refused as exc:
        return f"{after.name}: not applied ({exc})"
    rt.state.config_path = after.path
    return f"upgrading {after.name} to {target.version} ({strategy})"
