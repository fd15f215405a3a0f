"""What an upgrade or rollback does from its request to its plan: hash the file (a
cancel ends it there), check the digest and the label, then run ``pool.upgrade.Upgrade``.

``pool.control`` parses the request into a ``DeployRequest`` and starts ``deploy_op``
as the model's operation; ``running`` is the control server's map of what a cancel can
reach, a ``Preparing`` while the file hashes, then the ``Upgrade``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pool.labels import label_conflict
from pool.op_result import OpFailed
from pool.operations import ModelOp, digest_then
from pool.runtime import ModelRuntime
from pool.state import Deployed
from pool.supervisor import Supervisor
from pool.upgrade import Upgrade

log = logging.getLogger("pool.control")


@dataclass
class Preparing:
    """An upgrade or rollback still hashing its file, before any worker starts: a cancel
    now ends it there (Ctrl-C right after ``pool-ctl upgrade``, while a big file hashes)."""

    action: str
    version: str | None
    cancelled: str | None = None

    def cancel(self, why: str) -> None:
        self.cancelled = why


@dataclass(frozen=True)
class DeployRequest:
    """An upgrade or rollback as the control server checked it."""

    action: str  # upgrade | rollback
    path: str
    version: str | None  # None: the digest names it
    strategy: str
    timeout_s: float
    allow_contract_change: bool
    uid: int | None  # as pool-ctl reports it
    expect_digest: str | None = None  # a rollback: the digest its version was deployed with


def deploy_op(
    sup: Supervisor,
    rt: ModelRuntime,
    req: DeployRequest,
    running: dict[str, Upgrade | Preparing],
    progress: Callable[..., None],
) -> ModelOp:
    t_start = time.monotonic()
    path, version, action = req.path, req.version, req.action
    progress("digest", path=path)
    prep = Preparing(action, version)
    running[rt.name] = prep
    try:
        digest = yield from digest_then(
            sup, path, progress, stop=lambda: prep.cancelled is not None
        )
    finally:
        running.pop(rt.name, None)
    if prep.cancelled is not None:  # nothing started: nothing to put back
        return OpFailed(rt.name, prep.cancelled, "cancelled")
    if req.expect_digest and digest != req.expect_digest:
        return OpFailed(
            rt.name,
            f"{path} changed on disk since version {version} was "
            f"deployed ({digest[:19]} != {req.expect_digest[:19]})",
            "refused",
        )
    label = version or digest.split(":")[1][:12]
    conflict = label_conflict(rt.state, label, digest)
    if conflict:
        return OpFailed(rt.name, conflict, "refused")
    target = Deployed(label, path, digest)
    if sup.models[rt.name].failed:
        sup.clear_failed(rt)  # an upgrade is how an operator recovers a failed model
    up = Upgrade(sup, rt, target, req.strategy, req.timeout_s, action, progress)
    up.allow_contract_change = req.allow_contract_change
    up.t0 = t_start  # the caller's wait includes hashing the file
    extra: dict[str, Any] = {
        "model": rt.name, "event": "requested", "path": path, "digest": digest,
        "peer_uid": req.uid, "strategy": req.strategy,
    }  # fmt: skip
    log.info(
        "%s of %s requested: %s (%s) as version %s, strategy %s, by uid %s",
        action, rt.name, path, digest, label, req.strategy, req.uid, extra=extra,
    )  # fmt: skip
    running[rt.name] = up
    try:
        return (yield from up.run())
    finally:
        running.pop(rt.name, None)
