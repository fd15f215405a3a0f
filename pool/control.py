"""The control endpoint: pool-ctl's commands, answered from inside the event loop.

Frames (pool-ctl uses a DEALER socket, so one request may get several replies)::

    request   b"", b"gpu-pool-ctl/1", msgpack {"cmd": str, "args": {...}}
    replies   b"", b"gpu-pool-ctl/1", msgpack {"type": "progress", "phase": str, ...}   (0..n)
              b"", b"gpu-pool-ctl/1", msgpack {"type": "result", "ok": bool, "data": {...},
                                                "error": str}                          (1)

Every frame is untrusted: a malformed request gets an error result, never an exception
in the loop. Holding this socket means running code on the GPU host (upgrades load
model files), so it is ipc in an owner-only directory unless CURVE is configured.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from pool.config import PathNotAllowed, check_model_path
from pool.deploy import DeployRequest, Preparing, deploy_op
from pool.describe import describe_model
from pool.labels import label_problem
from pool.lifecycle import WorkerState
from pool.metrics import LATENCY_BUCKETS, PoolMetrics
from pool.op_result import result_message
from pool.operations import start_operation
from pool.reload import ReloadResult
from pool.runtime import ModelRuntime
from pool.spawn import SpawnerClient
from pool.supervisor import Supervisor
from pool.upgrade import Refused, Upgrade
from router import protocol as p
from router.router import Router

log = logging.getLogger(__name__)

CTL_PROTOCOL = b"gpu-pool-ctl/1"
STRATEGIES = ("auto", "surge", "drain-first")
Reply = Callable[[dict[str, Any]], None]


class CommandError(Exception):
    pass


class ControlServer:
    def __init__(
        self,
        sock: zmq.Socket[Any],
        sup: Supervisor,
        router: Router,
        spawner: SpawnerClient,
        roots: list[str],
        on_reload: Callable[[Callable[[ReloadResult], None]], None],
        metrics: PoolMetrics,
    ) -> None:
        self.sock = sock
        self.sup = sup
        self.metrics = metrics  # read for stats: the answers counted per model
        self.router = router  # read for status: queue depths, requests in flight
        self.spawner = spawner
        self.roots = roots
        self.on_reload = on_reload
        self.started = time.time()
        # model -> its upgrade/rollback (hashing, then running), for cancel
        self.running: dict[str, Upgrade | Preparing] = {}
        # The OIP gateways' processes for status (poold sets it once they exist).
        self.gateways: Callable[[], list[dict[str, Any]]] = list
        self.commands: dict[str, Callable[[dict[str, Any], Reply], None]] = {
            "status": self.cmd_status,
            "upgrade": self.cmd_upgrade,
            "rollback": self.cmd_rollback,
            "history": self.cmd_history,
            "describe": self.cmd_describe,
            "health": self.cmd_health,
            "reload": self.cmd_reload,
            "cancel": self.cmd_cancel,
            "stats": self.cmd_stats,
        }

    def handle(self) -> None:
        for _ in range(64):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._one(frames)

    def _one(self, frames: list[bytes]) -> None:
        if len(frames) >= 2 and frames[1] == b"":
            envelope, body = frames[:2], frames[2:]
        else:
            envelope, body = frames[:1], frames[1:]

        def reply(msg: dict[str, Any]) -> None:
            try:
                self.sock.send_multipart(
                    [*envelope, CTL_PROTOCOL, msgpack.packb(msg)], flags=zmq.NOBLOCK
                )
            except zmq.ZMQError as exc:
                log.debug("control reply lost: %s", exc)

        try:
            if len(body) != 2 or body[0] != CTL_PROTOCOL:
                raise CommandError(f"expected [{CTL_PROTOCOL!r}, msgpack request]")
            req = p.unpack_map(body[1], limit=1 << 16)
            cmd, args = req.get("cmd"), req.get("args", {})
            if not isinstance(args, dict):
                raise CommandError("args must be a map")
            handler = self.commands.get(cmd) if isinstance(cmd, str) else None
            if handler is None:
                raise CommandError(
                    f"unknown command {str(cmd)[:40]!r}; known: " + ", ".join(sorted(self.commands))
                )
            handler(args, reply)
        except (CommandError, Refused, PathNotAllowed) as exc:
            reply({"type": "result", "ok": False, "error": str(exc)})
        except p.ProtocolError as exc:
            reply({"type": "result", "ok": False, "error": exc.message})
        except Exception as exc:  # a handler bug must not take the whole daemon down
            log.exception("control request failed: %s", type(exc).__name__)
            reply(
                {
                    "type": "result",
                    "ok": False,
                    "error": f"internal error: {type(exc).__name__} (see poold's log)",
                }
            )

    # ------------------------------------------------------------------ helpers
    def model(self, args: dict[str, Any]) -> ModelRuntime:
        name = args.get("model")
        if not isinstance(name, str) or name not in self.sup.models:
            known = ", ".join(sorted(self.sup.models)) or "none"
            raise CommandError(f"no model named {str(name)[:64]!r}; models: {known}")
        return self.sup.models[name]

    @staticmethod
    def opt(args: dict[str, Any], key: str, kind: type, default: Any) -> Any:
        value = args.get(key, default)
        if value is None:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise CommandError(f"{key} must be {kind.__name__}")
        return value

    # ----------------------------------------------------------------- commands
    def cmd_status(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl status [--json]``: models, versions, workers, queues."""
        reply({"type": "result", "ok": True, "data": self.status()})

    def status(self) -> dict[str, Any]:
        models = []
        for rt in self.sup.models.values():
            dep = rt.deployed
            models.append(
                {
                    "name": rt.name,
                    "status": rt.status(),
                    "version": dep.version if dep else None,
                    "digest": dep.digest if dep else None,
                    "path": dep.path if dep else None,
                    "generation": rt.serving_gen,
                    "devices": list(rt.devices),
                    "queue": self.router.queue_len(rt.name),
                    "operation": rt.busy,
                    "failed": rt.failed,
                    "workers": [w.describe() for w in rt.workers if w.alive],
                }
            )
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "spawner_pid": self.spawner.pid,
            "inflight": self.router.inflight_count(),
            "state_unsaved": self.sup.ports.store.problem(),
            "models": models,
            "standby": self.sup.standbys.summary(),
            "gateways": self.gateways(),
        }

    def cmd_health(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl health``: ok when every model has a ready worker serving."""
        states = {rt.name: rt.status() for rt in self.sup.models.values()}
        ok = bool(states) and all(s in ("serving", "upgrading") for s in states.values())
        ok = ok and all(
            any(w.state is WorkerState.READY and w.generation == rt.serving_gen for w in rt.workers)
            for rt in self.sup.models.values()
        )
        unsaved = self.sup.ports.store.problem()  # serving, but a restart would not come back on it
        error = "" if ok else "not every model is serving"
        if unsaved:
            error = "; ".join(filter(None, [error, f"degraded: state not saved: {unsaved}"]))
        reply(
            {
                "type": "result",
                "ok": ok and not unsaved,
                "data": {"models": states, "state_unsaved": unsaved},
                "error": error,
            }
        )

    def cmd_stats(self, args: dict[str, Any], reply: Reply) -> None:
        """``stats``: per model, answers since poold started as ``[version, code, count]``
        rows and the end-to-end latency histogram (``bounds`` in seconds, ``counts`` one
        per bound then +Inf). ``pool-ctl fleet`` diffs two readings for its bake window."""
        models = {}
        for name in self.sup.models:
            t = self.metrics.request_totals(name)
            models[name] = {
                "requests": [[v, c, n] for (v, c), n in t.by_version_code.items()],
                "latency": {
                    "bounds": list(LATENCY_BUCKETS),
                    "counts": t.latency_counts,
                    "sum_s": t.latency_sum_s,
                },
            }
        reply({"type": "result", "ok": True, "data": {"models": models}})

    def cmd_history(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl history MODEL [--json]``: versions run, with outcome and timings."""
        rt = self.model(args)
        reply(
            {
                "type": "result",
                "ok": True,
                "data": {
                    "model": rt.name,
                    "history": rt.state.history,
                    "current": rt.deployed.__dict__ if rt.deployed else None,
                },
            }
        )

    def cmd_describe(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl describe MODEL [--json]``: the model's contract (``pool.describe``).

        Request args: model. Result data: see ``pool.describe`` (the same JSON as
        ``--json`` prints)."""
        reply({"type": "result", "ok": True, "data": describe_model(self.model(args))})

    def cmd_reload(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl reload`` (or SIGHUP): re-read the config and apply it.

        The result comes once every operation the reload started has finished: ok only
        when the config was valid and every change applied (see ``pool.reload``).
        """
        self.on_reload(lambda result: reply(result.message()))

    def cmd_cancel(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl cancel MODEL`` (and Ctrl-C during ``pool-ctl upgrade``).

        Request args: model, uid?. The running upgrade or rollback gives up at its next
        wait for a new worker and puts the serving version back; its own result then
        says rolled_back with the reason. Once traffic switched, it completes instead.
        One still hashing its file ends there (``Preparing``): outcome cancelled.
        """
        rt = self.model(args)
        up = self.running.get(rt.name)
        if up is None:
            raise CommandError(f"no upgrade or rollback of {rt.name!r} is running")
        uid = self.opt(args, "uid", int, None)
        up.cancel(f"cancelled by pool-ctl cancel (uid {uid})")
        log.warning("%s of %s: cancel requested by uid %s", up.action, rt.name, uid,
                    extra={"model": rt.name, "event": "cancel", "peer_uid": uid})  # fmt: skip
        target = up.target.version if isinstance(up, Upgrade) else up.version
        data = {"model": rt.name, "operation": up.action, "target_version": target}
        reply({"type": "result", "ok": True, "data": data})

    def cmd_upgrade(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl upgrade MODEL PATH [--version V] [--strategy S] [--timeout S]``.

        Request args: model, path, version?, strategy?, timeout_s?. Streams progress
        messages, then one result (ok true = committed, false = rolled back or refused).
        """
        rt = self.model(args)
        path = self.opt(args, "path", str, None)
        if not path:
            raise CommandError("path is required")
        if "\x00" in path:  # os.path.realpath raises ValueError on it
            raise CommandError("path must not contain a NUL character")
        real = check_model_path(path, self.roots)
        version = self.opt(args, "version", str, None)
        if version is not None and label_problem(version):
            raise CommandError(label_problem(version))
        self._run(rt, "upgrade", real, version, args, reply)

    def cmd_rollback(self, args: dict[str, Any], reply: Reply) -> None:
        """``pool-ctl rollback MODEL [--to VERSION]``: back to the previous (or named) version."""
        rt = self.model(args)
        to = self.opt(args, "to", str, None)
        current = rt.deployed
        candidates = [
            d
            for d in rt.state.versions()
            if current is None or (d.version, d.digest) != (current.version, current.digest)
        ]
        if to is not None:
            candidates = [d for d in candidates if d.version == to]
        if not candidates:
            raise CommandError(
                f"no earlier committed version{' ' + repr(to) if to else ''} "
                f"of {rt.name!r} to roll back to (see pool-ctl history)"
            )
        target = candidates[0]
        if not os.path.exists(target.path):
            raise CommandError(f"{target.path} (version {target.version}) no longer exists")
        self._run(rt, "rollback", target.path, target.version, args, reply, target.digest)

    def _run(
        self,
        rt: ModelRuntime,
        action: str,
        path: str,
        version: str | None,
        args: dict[str, Any],
        reply: Reply,
        expect_digest: str | None = None,
    ) -> None:
        strategy = self.opt(args, "strategy", str, "auto")
        if strategy not in STRATEGIES:
            raise CommandError(f"strategy must be one of {', '.join(STRATEGIES)}")
        timeout = self.opt(args, "timeout_s", float, self.sup.pool.upgrade_timeout_s)
        if timeout <= 0:
            raise CommandError("timeout must be positive")
        allow_change = self.opt(args, "allow_contract_change", bool, False)
        # As pool-ctl reports it: ipc peers' credentials do not reach us through ZeroMQ,
        # and the 0600 socket in a 0700 directory already limits callers to poold's user
        # and root.
        uid = self.opt(args, "uid", int, None)
        req = DeployRequest(action, path, version, strategy, timeout, allow_change, uid,
                            expect_digest)  # fmt: skip

        def progress(phase: str, **info: Any) -> None:
            reply({"type": "progress", "phase": phase, **info})

        op = deploy_op(self.sup, rt, req, self.running, progress)
        start_operation(self.sup, rt, action, op, lambda result: reply(result_message(result)))
