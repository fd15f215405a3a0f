"""``pool-ctl fleet upgrade|rollback|status|history``: the CLI side of pool/ctl/fleet_run.py.

Exit codes as for ``upgrade``: 0 committed everywhere, 1 failed (and rolled back, or
refused), 2 usage (a bad hosts file, a name that does not resolve), 3 a host unreachable
before anything changed (status: any host unreachable).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from pool.ctl import fleet_history
from pool.ctl.client import ControlClient, Unreachable
from pool.ctl.fleet_bake import BakeRules
from pool.ctl.fleet_hosts import HostsError, hosts_from_dns, read_hosts_file
from pool.ctl.fleet_run import Call, FleetPhase, FleetResult, Rollout

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

EPILOG = """\
examples:
  pool-ctl fleet status --hosts hosts.txt
  pool-ctl fleet upgrade --hosts hosts.txt resnet /srv/models/resnet/4/model.pt --version 4
  pool-ctl fleet upgrade --dns gpu-pool-control.prod.svc:5556 resnet \\
      /srv/models/resnet/4/model.pt --version 4 --bake 120 --max-unavailable 5
  pool-ctl fleet rollback --hosts hosts.txt resnet          every host back to where the
                                                            last fleet upgrade found it
  pool-ctl fleet history

hosts.txt: one control endpoint per line (tcp://10.0.0.7:5556); the first is the canary.
CURVE: pool-ctl's own --curve-server-key/--curve-client-key (before "fleet") apply to
every host. exit codes: 0 ok, 1 failed and rolled back, 2 usage, 3 a host unreachable.
"""


def add_fleet_parser(sub: Any) -> None:
    fleet = sub.add_parser(
        "fleet",
        help="upgrade or roll back a model across many hosts: canary first, then host by host",
        description="Upgrade or roll back one model across many poold hosts: a canary host "
        "first, a bake window comparing it with the rest, then the others.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = argparse.ArgumentParser(add_help=False)
    src = where.add_mutually_exclusive_group(required=True)
    src.add_argument("--hosts", metavar="FILE", help="control endpoints, one per line")
    src.add_argument("--dns", metavar="NAME:PORT", help="every address of NAME, on PORT")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    common.add_argument("--history", metavar="FILE", help="the fleet history file")
    actions = fleet.add_subparsers(dest="fleet_action", metavar="ACTION", required=True)

    def rollout_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("model")
        p.add_argument("--canary", metavar="ENDPOINT", help="the host to go first")
        p.add_argument(
            "--max-unavailable",
            type=int,
            default=1,
            metavar="N",
            help="hosts changed at once after the canary (default 1)",
        )
        p.add_argument("--strategy", choices=("auto", "surge", "drain-first"), default="auto")
        p.add_argument("--timeout", type=float, metavar="S", help="per-host operation timeout")
        p.add_argument(
            "--bake",
            type=float,
            metavar="S",
            help="seconds the canary serves before the rest follow "
            "(default: 30 for upgrade, 0 for rollback)",
        )
        p.add_argument(
            "--max-error-rate-increase",
            type=float,
            default=0.01,
            metavar="X",
            help="canary error rate allowed above the rest's (default 0.01)",
        )
        p.add_argument(
            "--max-latency-ratio",
            type=float,
            default=1.5,
            metavar="R",
            help="canary mean latency allowed, times the rest's (default 1.5)",
        )
        p.add_argument(
            "--bake-min-requests",
            type=int,
            default=0,
            metavar="N",
            help="fail the bake when the canary answers fewer (default 0)",
        )

    up = actions.add_parser(
        "upgrade",
        parents=[where, common],
        help="canary, bake, then every host; undone on any failure",
    )
    rollout_opts(up)
    up.add_argument("path", help="model file, at the same path on every host")
    up.add_argument("--version", help="version label (default: the canary's digest label)")
    rb = actions.add_parser(
        "rollback", parents=[where, common], help="every host back (no bake unless --bake)"
    )
    rollout_opts(rb)
    rb.add_argument(
        "--to",
        metavar="VERSION",
        help="this version everywhere (default: each host's version before the "
        "last committed fleet upgrade of MODEL, from the fleet history)",
    )
    st = actions.add_parser("status", parents=[where, common], help="every host's versions")
    st.add_argument("model", nargs="?", help="only this model")
    actions.add_parser("history", parents=[common], help="past fleet operations")


def control_call(
    connect_timeout_s: float, server_key: bytes | None, client_keys: tuple[bytes, bytes] | None
) -> Call:
    def call(host: str, cmd: str, args: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        client = ControlClient(
            host,
            connect_timeout_s=connect_timeout_s,
            server_key=server_key,
            client_keys=client_keys,
        )
        return client.call(cmd, args, timeout_s=timeout_s)

    return call


def run_fleet(args: argparse.Namespace, call: Call, err: Callable[[str], None]) -> int:
    history = args.history or fleet_history.default_history_path()
    if args.fleet_action == "history":
        return show_history(fleet_history.read(history), args.json)
    try:
        hosts = read_hosts_file(args.hosts) if args.hosts else hosts_from_dns(args.dns)
    except HostsError as exc:
        err(f"pool-ctl fleet: {exc}")
        return EXIT_USAGE
    if args.fleet_action == "status":
        return show_status(hosts, call, args.model, args.json)
    say = err if (not args.json or sys.stderr.isatty()) else (lambda line: None)
    bake_default = 30.0 if args.fleet_action == "upgrade" else 0.0
    rules = BakeRules(
        seconds=bake_default if args.bake is None else args.bake,
        max_error_rate_increase=args.max_error_rate_increase,
        max_latency_ratio=args.max_latency_ratio,
        min_requests=args.bake_min_requests,
    )
    try:
        rollout = Rollout(
            hosts,
            args.model,
            call,
            max_unavailable=args.max_unavailable,
            canary=args.canary,
            rules=rules,
            strategy=args.strategy,
            timeout_s=args.timeout,
            say=say,
        )
    except ValueError as exc:
        err(f"pool-ctl fleet: {exc}")
        return EXIT_USAGE
    if args.fleet_action == "upgrade":
        result = rollout.upgrade(os.path.abspath(args.path), args.version)
    else:
        targets = rollback_targets(hosts, args.model, args.to, fleet_history.read(history))
        if isinstance(targets, str):
            err(f"pool-ctl fleet: {targets}")
            return EXIT_USAGE
        result = rollout.rollback(targets)
    record = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **result.to_dict()}
    if result.outcome is not FleetPhase.REFUSED:
        fleet_history.append(history, record)
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        print_result(result)
    if result.ok:
        return EXIT_OK
    if result.outcome is FleetPhase.REFUSED and result.unreachable:
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def rollback_targets(
    hosts: list[str], model: str, to: str | None, records: list[dict[str, Any]]
) -> dict[str, str] | str:
    if to:
        return {h: to for h in hosts}
    last = fleet_history.last_committed_upgrade(records, model)
    if last is None:
        return f"no committed fleet upgrade of {model!r} in the fleet history; pass --to VERSION"
    before = last.get("before") or {}
    missing = [h for h in hosts if not before.get(h)]
    if missing:
        return (
            f"the last fleet upgrade of {model!r} did not include {', '.join(missing)}; "
            "pass --to VERSION"
        )
    return {h: str(before[h]) for h in hosts}


def print_result(r: FleetResult) -> None:
    print(f"fleet {r.action} of {r.model}: {r.outcome.value} ({r.seconds:.1f}s)")
    print(f"  {r.reason}")
    for s in r.steps:
        mark = "ok" if s.ok else "FAILED"
        extra = f": {s.reason}" if s.reason and not s.ok else ""
        print(
            f"  {s.host:<32} {s.action:<9} {s.version_before} -> {s.version_after}  {mark}{extra}"
        )
    if r.bake:
        print(f"  bake: {r.bake['reason']}")


def fleet_status(hosts: list[str], call: Call, model: str | None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    versions: dict[str, dict[str, list[str]]] = {}
    for host in hosts:
        try:
            res = call(host, "status", {}, None)
        except (Unreachable, TimeoutError, OSError) as exc:
            rows.append({"host": host, "reachable": False, "error": str(exc), "models": []})
            continue
        models = [
            m
            for m in (res.get("data") or {}).get("models", [])
            if model is None or m["name"] == model
        ]
        rows.append(
            {
                "host": host,
                "reachable": True,
                "models": [
                    {k: m.get(k) for k in ("name", "version", "status", "operation")}
                    for m in models
                ],
            }
        )
        for m in models:
            versions.setdefault(m["name"], {}).setdefault(str(m.get("version")), []).append(host)
    return {
        "hosts": rows,
        "versions": versions,
        "consistent": all(len(v) == 1 for v in versions.values()),
        "unreachable": [r["host"] for r in rows if not r["reachable"]],
    }


def show_status(hosts: list[str], call: Call, model: str | None, as_json: bool) -> int:
    data = fleet_status(hosts, call, model)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        for row in data["hosts"]:
            if not row["reachable"]:
                print(f"{row['host']:<32} UNREACHABLE  {row['error']}")
                continue
            models = "  ".join(
                f"{m['name']} v{m['version']} ({m['operation'] or m['status']})"
                for m in row["models"]
            )
            print(f"{row['host']:<32} {models or '-'}")
        for name, by_version in data["versions"].items():
            spread = ", ".join(f"v{v} on {len(h)}" for v, h in by_version.items())
            note = "" if len(by_version) == 1 else "  (MIXED)"
            print(f"{name}: {spread}{note}")
    return EXIT_UNREACHABLE if data["unreachable"] else EXIT_OK


def show_history(records: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(records, indent=2))
        return EXIT_OK
    if not records:
        print("no fleet operations recorded")
    for r in records:
        print(
            f"{r.get('at', '?')}  {r.get('action', '?'):<8} {r.get('model', '?')} -> "
            f"{r.get('target', '?')}  {r.get('outcome', '?')}  on {len(r.get('hosts', []))} "
            f"host(s): {r.get('reason', '')}"
        )
    return EXIT_OK
