"""Control commands for runtime model management (see ``pool.manage``).

Each handler's message and CLI use::

    load    {"model", "path", "devices"?: [str], "max_batch"?: int, "version"?: str}
            pool-ctl load MODEL PATH [--devices D ...] [--max-batch N] [--version V]
    unload  {"model"}                      pool-ctl unload MODEL
    scale   {"model", "devices": [str]}    pool-ctl scale MODEL --devices D ...
    list    {}                             pool-ctl list

load, unload and scale stream progress and end with one result (ok false: failed, and
nothing changed); they are refused while another operation runs on the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pool.config import ConfigError, PathNotAllowed, check_model_path
from pool.lifecycle import WorkerState
from pool.op_result import OpResult, result_message

if TYPE_CHECKING:
    from pool.control import ControlServer
    from pool.manage import Manager

Reply = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Reply], None]


def _finish(reply: Reply) -> Callable[[OpResult], None]:
    return lambda result: reply(result_message(result, fallback="failed"))


def _progress(reply: Reply) -> Callable[..., None]:
    return lambda phase, **info: reply({"type": "progress", "phase": phase, **info})


def manage_commands(m: Manager, ctl: ControlServer) -> dict[str, Handler]:
    from pool.control import CommandError

    def devices(args: dict[str, Any], required: bool) -> list[str] | None:
        value = args.get("devices")
        if value is None and not required:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise CommandError('devices must be a non-empty list such as ["cuda:0", "cpu"]')
        return list(value)

    def cmd_load(args: dict[str, Any], reply: Reply) -> None:
        name = ctl.opt(args, "model", str, None)
        path = ctl.opt(args, "path", str, None)
        if not name or not path or "\x00" in path:
            raise CommandError("model and path are required")
        real = check_model_path(path, ctl.roots)  # PathNotAllowed: refused with the reason
        entry: dict[str, Any] = {"name": name, "path": real}
        devs = devices(args, required=False)
        if devs is not None:
            entry["devices"] = devs
        for key, kind in (("max_batch", int), ("version", str)):
            value = ctl.opt(args, key, kind, None)
            if value is not None:
                entry[key] = value
        try:
            cfg = m.model_config(entry)
        except ConfigError as exc:
            raise CommandError("; ".join(exc.problems)) from None
        m.load(cfg, _finish(reply), _progress(reply))

    def cmd_unload(args: dict[str, Any], reply: Reply) -> None:
        m.unload(ctl.model(args), _finish(reply), _progress(reply))

    def cmd_scale(args: dict[str, Any], reply: Reply) -> None:
        rt = ctl.model(args)
        devs = devices(args, required=True) or []
        try:
            m.model_config({"name": rt.name, "path": rt.cfg.path, "devices": devs})
        except ConfigError as exc:
            raise CommandError("; ".join(exc.problems)) from None
        except PathNotAllowed:
            pass  # the path is the running model's own; only the devices are checked here
        m.scale(rt, tuple(devs), _finish(reply), _progress(reply))

    def cmd_list(args: dict[str, Any], reply: Reply) -> None:
        models = []
        for rt in m.sup.models.values():
            dep = rt.deployed
            ready = [w for w in rt.workers if w.state is WorkerState.READY]
            models.append(
                {
                    "name": rt.name,
                    "version": dep.version if dep else None,
                    "status": rt.status(),
                    "devices": list(rt.devices),
                    "ready": sum(w.generation == rt.serving_gen for w in ready),
                    "path": dep.path if dep else rt.cfg.path,
                    "failed": rt.failed,
                }
            )
        reply({"type": "result", "ok": True, "data": {"models": models}})

    return {"load": cmd_load, "unload": cmd_unload, "scale": cmd_scale, "list": cmd_list}
