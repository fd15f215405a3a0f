"""pool-ctl: inspect and operate a running poold.

Exit codes: 0 success, 1 operation failed (rolled back or refused), 2 usage error,
3 poold unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pool.ctl.client import ControlClient, Unreachable
from pool.ctl.describe import print_describe
from pool.ctl.endpoint import choose_endpoint
from pool.ctl.fleet_cli import add_fleet_parser, control_call, run_fleet
from pool.ctl.render import (
    Progress,
    describe_done,
    print_history,
    print_list,
    print_reload,
    print_status,
    print_upgrade,
    say,
)
from pool.labels import label_problem
from pool.version import version_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

EPILOG = """\
examples:
  pool-ctl status                          models, versions, workers, queues
  pool-ctl status --json | jq .models      the same, for scripts
  pool-ctl upgrade demo ~/.local/state/gpu-pool/demo/demo-v2.pt --version 2
  pool-ctl upgrade resnet /srv/models/resnet/4/model.pt --strategy drain-first
  pool-ctl rollback demo                   back to the previous committed version
  pool-ctl rollback demo --to 1
  pool-ctl history demo
  pool-ctl describe demo --json            inputs, outputs, batching, versions
  pool-ctl health && echo serving          exit 0 only when every model serves
  pool-ctl load bert /srv/models/bert/1/model.pt --devices cuda:0 cuda:1 --max-batch 16
  pool-ctl scale bert --devices cuda:0     same version, one worker (zero-loss)
  pool-ctl unload bert                     drain, then stop serving it
  pool-ctl cancel resnet                   roll back the upgrade running now (Ctrl-C does too)
  pool-ctl reload                          apply edits of the config file; exit 1 if any failed

exit codes: 0 ok, 1 failed (rolled back, refused, unhealthy), 2 usage, 3 poold unreachable
Without --control: $GPU_POOL_CONTROL, else the first that exists of
$XDG_RUNTIME_DIR/gpu-pool/control.sock (or the state dir's control.sock) and the system
unit's /run/gpu-pool/control.sock (run as root or as the gpu-pool user).
Output is a table on a terminal and plain columns (one row a line) in a pipe.
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pool-ctl",
        description="Inspect and operate a running gpu-pool daemon (poold).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=version_line("pool-ctl"))
    ap.add_argument(
        "--control", metavar="ENDPOINT", help="poold's control endpoint (ipc://PATH or tcp://H:P)"
    )
    ap.add_argument(
        "--connect-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to wait for poold's first answer (default 5)",
    )
    ap.add_argument(
        "--curve-server-key",
        metavar="FILE",
        help="poold's public key file, for a tcp:// control endpoint with CURVE",
    )
    ap.add_argument(
        "--curve-client-key",
        metavar="FILE",
        help="this client's secret key file (its public key must be authorised)",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        return p

    add("status", "models, current version, every worker, queue depths")
    add("health", "exit 0 when every model has a ready worker, else 1")
    add("reload", "re-read poold's config file and apply the changes")
    up = add("upgrade", "hot update: blocks until committed (exit 0) or rolled back (exit 1)")
    up.add_argument("model")
    up.add_argument("path", help="model file (TorchScript .pt, torch.export .pt2, .safetensors)")
    up.add_argument("--version", help="version label (default: a content digest)")
    for p in (up, add("rollback", "back to the previous (or a named) committed version")):
        if p is not up:
            p.add_argument("model")
            p.add_argument("--to", metavar="VERSION", help="a version from pool-ctl history")
        p.add_argument(
            "--strategy",
            choices=("auto", "surge", "drain-first"),
            default="auto",
            help="surge: new beside old; drain-first: one device at a time "
            "(when the GPU cannot hold both); auto: decide from free memory",
        )
        p.add_argument(
            "--allow-contract-change",
            action="store_true",
            help="switch even when the new version's inputs or outputs (dtype, shape, "
            "rank, batching) differ from the serving version's; refused otherwise",
        )
        p.add_argument(
            "--timeout",
            type=float,
            metavar="S",
            help="give up and roll back if not done in S seconds",
        )
    hist = add("history", "the versions a model has run, with outcome and timings")
    hist.add_argument("model")
    add("list", "the models served, one line each")
    cancel = add("cancel", "stop a running upgrade or rollback; the serving version stays")
    cancel.add_argument("model")
    load = add("load", "start serving a new model (persisted: a restart keeps it)")
    load.add_argument("model")
    load.add_argument("path", help="model file under one of poold's model_roots")
    load.add_argument("--devices", nargs="+", metavar="D", help="cpu or cuda:N, one worker each")
    load.add_argument("--max-batch", type=int, metavar="N", help="largest batch (default 8)")
    load.add_argument("--version", help="version label (default: a content digest)")
    unload = add("unload", "drain a model (nothing lost) and stop serving it (persisted)")
    unload.add_argument("model")
    scale = add("scale", "run the live version on other devices, zero-loss (persisted)")
    scale.add_argument("model")
    scale.add_argument("--devices", nargs="+", metavar="D", required=True)
    desc = add(
        "describe",
        "the model's contract: inputs and outputs (names, dtypes, shapes, batch dim), "
        "versions, batching, devices",
    )
    desc.add_argument("model")
    add_fleet_parser(sub)
    return ap


def curve_keys(
    server: str | None, client: str | None
) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    """Keys for a CURVE control endpoint, from zmq.auth certificate files."""
    if not server and not client:
        return None, None
    if not (server and client):
        raise ValueError("--curve-server-key and --curve-client-key go together")
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server)
    public, secret = zmq.auth.load_certificate(client)
    if secret is None:
        raise ValueError(f"{client} holds no secret key (pass the .key_secret file)")
    return server_public, (public, secret)


def fleet_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        server_key, client_keys = curve_keys(args.curve_server_key, args.curve_client_key)
    except (OSError, ValueError) as exc:
        parser.print_usage(sys.stderr)
        print(f"pool-ctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    call = control_call(args.connect_timeout, server_key, client_keys)
    return run_fleet(args, call, lambda line: print(line, file=sys.stderr, flush=True))


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # ``pool-ctl status | head``: the reader left. Point stdout at /dev/null so that
        # the interpreter's own flush at exit does not raise again; no traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a message on bad usage
    if args.command == "fleet":  # many hosts: no local endpoint to choose
        return fleet_main(parser, args)
    try:
        choice = choose_endpoint(args.control)
        endpoint = choice.endpoint
        server_key, client_keys = curve_keys(args.curve_server_key, args.curve_client_key)
    except (OSError, ValueError) as exc:  # BadEndpoint is a ValueError
        parser.print_usage(sys.stderr)
        print(f"pool-ctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.connect_timeout <= 0:
        parser.error("--connect-timeout must be positive")
    client = ControlClient(
        endpoint,
        connect_timeout_s=args.connect_timeout,
        server_key=server_key,
        client_keys=client_keys,
    )
    cmd: str = args.command
    payload: dict[str, Any] = {}
    if cmd in ("upgrade", "rollback", "history", "describe", "load", "unload", "scale", "cancel"):
        payload["model"] = args.model
        payload["uid"] = os.getuid()  # for poold's log: who asked
    if cmd == "load":
        payload["path"] = os.path.abspath(args.path)
        for key in ("devices", "max_batch", "version"):
            if getattr(args, key) is not None:
                payload[key] = getattr(args, key)
    if cmd == "scale":
        payload["devices"] = args.devices
    if cmd == "upgrade":
        payload["path"] = os.path.abspath(args.path)
        if args.version:
            if label_problem(args.version):
                parser.error(str(label_problem(args.version)))
            payload["version"] = args.version
    if cmd == "rollback" and args.to:
        payload["to"] = args.to
    timeout = None
    if cmd in ("upgrade", "rollback"):
        payload["strategy"] = args.strategy
        if args.allow_contract_change:
            payload["allow_contract_change"] = True
        if args.timeout:
            payload["timeout_s"] = args.timeout
        timeout = (args.timeout or 3600.0) + 120.0
    if cmd in ("reload", "load", "unload", "scale"):
        timeout = 3600.0 + 120.0  # they wait for the workers they start and stop
    tty = sys.stderr.isatty()

    def interrupted() -> None:
        """Ctrl-C during an upgrade: ask poold to roll back, then wait for its result."""
        print("pool-ctl: cancelling (Ctrl-C again to stop waiting)", file=sys.stderr)
        answer = client.call("cancel", {"model": args.model, "uid": os.getuid()})
        if not answer.get("ok"):
            print(f"pool-ctl: {answer.get('error')}", file=sys.stderr)

    try:
        result = client.call(
            cmd,
            payload,
            timeout_s=timeout,
            progress=Progress(sys.stderr, tty, quiet=args.json and not tty),
            on_interrupt=interrupted if cmd in ("upgrade", "rollback") else None,
        )
    except Unreachable as exc:
        print(f"pool-ctl: {exc}", file=sys.stderr)
        if len(choice.tried) > 1:
            print(f"pool-ctl: looked at {', '.join(choice.tried)}; pass --control", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TimeoutError as exc:
        print(f"pool-ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pool-ctl: interrupted; poold carries on (see pool-ctl status)", file=sys.stderr)
        return EXIT_FAILED
    return report(cmd, args.json, result)


def report(cmd: str, as_json: bool, result: dict[str, Any]) -> int:
    """Print a command's result and return the exit code."""
    ok = bool(result.get("ok"))
    data = result.get("data") or {}
    error = str(result.get("error") or "")
    if as_json:
        print(json.dumps({"ok": ok, "error": error or None, **data}, indent=2, default=str))
        return EXIT_OK if ok else EXIT_FAILED
    if cmd in ("upgrade", "rollback"):
        print_upgrade(data, error)
    elif cmd == "reload":
        print_reload(data)
    elif cmd == "health":
        for name, state in (data.get("models") or {}).items():
            say(f"{name}: {state}")
    elif ok and cmd == "status":
        print_status(data)
    elif ok and cmd == "history":
        print_history(data)
    elif ok and cmd == "list":
        print_list(data)
    elif ok and cmd == "cancel":
        say(f"{data.get('model')}: cancelling {data.get('operation')} to "
            f"{data.get('target_version')}; it rolls back at its next step")  # fmt: skip
    elif ok and cmd in ("load", "unload", "scale"):
        say(f"{data.get('model')}: {data.get('outcome') or 'done'} ({describe_done(data)})")
    elif ok and cmd == "describe":
        print_describe(data)
    # A refused command has no result to show (no "history of None"), only the reason.
    if not ok and cmd not in ("upgrade", "rollback"):
        print(f"pool-ctl: {error or 'failed'}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
