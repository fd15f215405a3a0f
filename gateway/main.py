"""``python -m gateway``: one Open Inference Protocol endpoint (HTTP or gRPC) for poold.

poold starts one such process per configured protocol (``[pool] http`` / ``grpc``),
restarts it with back-off if it dies and stops it at shutdown (pool/gateways.py). It can
also be run by hand against a running pool::

    python -m gateway --protocol http --listen 127.0.0.1:8000 \\
        --frontend tcp://127.0.0.1:5555 --control ipc://$XDG_RUNTIME_DIR/gpu-pool/control.sock

It exits when poold does: poold passes the read end of a pipe (``--lifeline-fd``) whose
write end only poold holds, and the kernel closes it when poold dies.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from gateway.catalog import Catalog, ControlLink
from gateway.stats import Stats
from gateway.upstream import RouterLink, Upstream
from gateway.zmtp import ZmtpUpstream
from pool.logs import setup_logging
from router.lifeline import watch_lifeline

log = logging.getLogger("gateway")
EPILOG = """\
example (against a running pool, by hand):
  python -m gateway --protocol http --listen 127.0.0.1:8000 \\
      --frontend tcp://127.0.0.1:5555 --control ipc://$XDG_RUNTIME_DIR/gpu-pool/control.sock
  curl -s 127.0.0.1:8000/v2/health/ready -o /dev/null -w '%{http_code}\\n'
"""
STATS_EVERY_S = 1.0
GRACE_S = 10.0  # at shutdown: how long requests in flight may take


def server_version() -> str:
    try:
        return version("gpu-pool")
    except PackageNotFoundError:
        return "0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Serve gpu-pool's models over the Open Inference Protocol (KServe v2). "
        "poold runs it for you when [pool] http or grpc is set; by hand it is one more "
        "client of a running pool.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--protocol", choices=("http", "grpc"), required=True)
    ap.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to bind")
    ap.add_argument("--frontend", required=True, help="poold's frontend endpoint (ZeroMQ)")
    ap.add_argument("--control", required=True, help="poold's control endpoint (ZeroMQ)")
    ap.add_argument("--tls-cert", default="", help="PEM certificate: serve TLS")
    ap.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    ap.add_argument("--token-file", default="", help="file holding the bearer token to require")
    ap.add_argument("--curve-keys", default="", help="file: server, public, secret key (z85)")
    ap.add_argument("--stats", default="", help="where to write the metrics snapshot (JSON)")
    ap.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the port with other gateway processes (SO_REUSEPORT)",
    )
    ap.add_argument(
        "--spin-us",
        type=int,
        default=0,
        metavar="N",
        help="busy-poll for N microseconds before the loop sleeps (0: off, uvloop as "
        "usually); a wake-up saved per idle moment for a core's time (gateway/spin_loop.py)",
    )
    ap.add_argument(
        "--libzmq",
        action="store_true",
        help="reach the router through libzmq's DEALER even without CURVE (to compare)",
    )
    ap.add_argument("--max-body-mb", type=int, default=1024, help="largest request body")
    ap.add_argument("--lifeline-fd", type=int, default=-1, help="exit when this fd hits EOF")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--log-format", choices=("text", "json"), default="text")
    return ap.parse_args(argv)


def split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def read_secret(path: str) -> str:
    if not path:
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def read_curve(path: str) -> tuple[bytes, bytes, bytes] | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        server, public, secret = fh.read().split()[:3]
    return server, public, secret


def on_poold_gone() -> None:
    log.info("poold is gone: gateway [pid %d] exits", os.getpid())
    os._exit(0)  # nothing left to answer for: there is no router any more


async def _serve(args: argparse.Namespace) -> int:
    curve = read_curve(args.curve_keys)
    # Our own ZMTP from the loop unless CURVE (or --libzmq) asks for libzmq's DEALER:
    # no I/O thread to wake twice per request (gateway/zmtp.py says why).
    upstream: Upstream | ZmtpUpstream
    if curve is None and not args.libzmq:
        upstream = ZmtpUpstream(args.frontend)
    else:
        upstream = Upstream(args.frontend, curve=curve)
    upstream.start()
    catalog = Catalog(ControlLink(args.control, curve=curve))
    stats = Stats(args.stats)
    token = read_secret(args.token_file)
    host, port = split_listen(args.listen)

    if args.lifeline_fd >= 0:
        watch_lifeline(args.lifeline_fd, on_poold_gone)

    async def write_stats() -> None:
        while True:
            try:
                stats.write()
            except OSError as exc:
                log.debug("stats snapshot: %s", exc)
            await asyncio.sleep(STATS_EVERY_S)

    stats_task = asyncio.create_task(write_stats())
    try:
        if args.protocol == "http":
            await _serve_http(args, upstream, catalog, stats, token, host, port)
        else:
            await _serve_grpc(args, upstream, catalog, stats, token, host, port)
    finally:
        stats_task.cancel()
        try:
            stats.write()
        except OSError:
            pass
        upstream.close()
    return 0


async def _serve_http(
    args: argparse.Namespace,
    upstream: RouterLink,
    catalog: Catalog,
    stats: Stats,
    token: str,
    host: str,
    port: int,
) -> None:
    from gateway.http_api import HttpApi
    from gateway.http_server import HttpServer, tls_context
    from gateway.http_wire import Limits

    api = HttpApi(
        upstream,
        catalog,
        stats,
        token=token,
        server_version=server_version(),
    )
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    limits = Limits(max_body=args.max_body_mb << 20, max_connections=connection_cap())
    server = HttpServer(api.handle, limits, tls)
    await server.start(host, port, _reuse_port_socket(host, port) if args.reuse_port else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway [pid %d] serving OIP/HTTP on %s", os.getpid(), args.listen)
    await stop.wait()
    await server.shutdown(GRACE_S)  # stop accepting, finish what is in flight


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket that other gateway processes of this pool bind too: the kernel
    spreads connections over them (Linux lets only the same user join the group)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _serve_grpc(
    args: argparse.Namespace,
    upstream: RouterLink,
    catalog: Catalog,
    stats: Stats,
    token: str,
    host: str,
    port: int,
) -> None:
    import grpc

    from gateway.grpc_api import InferenceService, add_to_server

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 1 << 30),
            ("grpc.max_send_message_length", 1 << 30),
            # Off unless asked: a second process must not share our port by accident.
            ("grpc.so_reuseport", 1 if args.reuse_port else 0),
        ]
    )
    add_to_server(
        server,
        InferenceService(upstream, catalog, stats, token=token, server_version=server_version()),
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise SystemExit(f"cannot bind {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gateway [pid %d] serving OIP/gRPC on %s", os.getpid(), args.listen)
    await stop.wait()
    await server.stop(grace=GRACE_S)  # finish what is in flight; refuse new calls


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_below: int = 64 << 20, trim_above: int = 256 << 20) -> bool:
    """Let glibc reuse freed tensor buffers instead of handing them back to the kernel.

    A request's tensors are a few buffers of hundreds of KiB (the body, the protobuf's
    bytes, the reply); glibc's defaults mmap such a buffer and unmap it on free, so every
    request paid a page fault per 4 KiB, and on a VM those are dear: three 294 KiB
    buffers took 500-540 us to allocate, fill and free, against 22-28 us from a heap that
    keeps them (measured on the 2-core VM). Buffers of ``mmap_below`` and up are still
    mapped; free heap is returned once more than ``trim_above`` of it is idle. False
    where the C library has no mallopt (not glibc): nothing changes then."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_below)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_above)
    )


FD_RESERVE = 64  # descriptors besides clients': the router and control links, the
# listening socket, the loop's own, the stats snapshot, logs


def connection_cap() -> int:
    """How many client connections the HTTP server takes at once: the descriptor limit
    (raised to its hard limit first) less ``FD_RESERVE``, so that a flood of idle
    connections is answered 503 instead of leaving no descriptor for anything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - FD_RESERVE)


def _loop_runner(spin_us: int) -> Callable[..., Any]:
    """How the gateway runs its loop: uvloop where installed (both protocols: the router
    link's reads and writes are the loop's own, gateway/zmtp.py), asyncio's own loop on a
    spinning selector when ``--spin-us`` asks (uvloop's epoll cannot be told to spin)."""
    if spin_us > 0:
        from gateway.spin_loop import spinning_loop_factory

        def run_spinning(coro: Any) -> Any:
            with asyncio.Runner(loop_factory=spinning_loop_factory(spin_us)) as runner:
                return runner.run(coro)

        return run_spinning
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_format, args.log_level)  # poold's format: one log, one look
    keep_freed_memory()
    try:
        return int(_loop_runner(args.spin_us)(_serve(args)))
    except KeyboardInterrupt:  # a SIGINT before the loop's handlers are in place
        return 0
    except OSError as exc:
        log.error("gateway cannot serve %s: %s", args.listen, exc)
        return 1
