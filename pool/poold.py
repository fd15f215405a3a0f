"""poold's command line: parse arguments, load or check the config, run the daemon."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys

import zmq

from pool.config import (
    Config,
    ConfigError,
    ModelConfig,
    PoolConfig,
    check_config,
    load_config,
)
from pool.daemon import Daemon
from pool.dirs import UnsafeDirectory
from pool.gpu import Gpu
from pool.logs import setup_logging
from pool.process_env import owner_only_dir
from pool.version import version_line
from router.fastlane import FastlaneUnavailable

log = logging.getLogger("poold")


def demo_config(base: Config, gpu: Gpu) -> Config:
    """The built-in demo model, generated on first run (in a child: poold never imports torch)."""
    demo_dir = os.path.join(base.pool.state_dir, "demo")
    owner_only_dir(demo_dir)
    subprocess.run([sys.executable, "-m", "workers.demo", demo_dir], check=True)
    device = "cuda:0" if gpu.count() > 0 else "cpu"
    model = ModelConfig(
        name="demo",
        path=os.path.join(demo_dir, "demo-v1.pt"),
        version="1",
        devices=(device,),
        max_batch=8,
        max_delay_ms=1.0,
    )
    return Config(pool=demo_oip(base.pool), models=(model,), source=base.source)


def demo_oip(pool: PoolConfig) -> PoolConfig:
    """The demo speaks the Open Inference Protocol too, where the config left it off."""
    return dataclasses.replace(pool, http=pool.http or DEMO_HTTP, grpc=pool.grpc or DEMO_GRPC)


DEMO_HTTP = "127.0.0.1:8000"
DEMO_GRPC = "127.0.0.1:8001"


def oip_banner(config: Config) -> str:
    """Where the OIP endpoints are, for people starting poold by hand."""
    lines = []
    if config.pool.http:
        scheme = "https" if config.pool.oip_tls_cert else "http"
        lines.append(f"Open Inference Protocol over HTTP: {scheme}://{config.pool.http}/v2")
    if config.pool.grpc:
        lines.append(f"Open Inference Protocol over gRPC: {config.pool.grpc}")
    return "\n".join(lines)


EPILOG = """\
examples:
  poold --demo                       serve the built-in demo model (no config needed)
  poold --config /etc/gpu-pool/pool.toml
  poold --check-config pool.toml     report every problem in a config, start nothing

environment: GPU_POOL_<KEY> overrides [pool] keys (e.g. GPU_POOL_FRONTEND=tcp://127.0.0.1:6000).
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="poold",
        description="Serve PyTorch models from one-model GPU worker processes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=version_line("poold"))
    ap.add_argument("--config", metavar="FILE", help="TOML config (default: the demo)")
    ap.add_argument("--demo", action="store_true", help="serve the built-in demo model")
    ap.add_argument("--check-config", metavar="FILE", help="validate FILE and exit (0 ok, 2 bad)")
    ap.add_argument("--log-format", choices=("text", "json"), help="overrides pool.log_format")
    ap.add_argument("--log-level", help="overrides pool.log_level")
    args = ap.parse_args(argv)
    if args.check_config:
        problems = check_config(args.check_config)
        for problem in problems:
            print(f"{args.check_config}: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.check_config}: ok")
        return 2 if problems else 0
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return 2
    setup_logging(
        args.log_format or config.pool.log_format, args.log_level or config.pool.log_level
    )
    gpu = Gpu()
    if args.demo or not config.models:
        config = demo_config(config, gpu)
    daemon = Daemon(config)
    banner = oip_banner(config)
    if banner:
        print(banner, flush=True)
    try:
        daemon.setup()
    except zmq.ZMQError as exc:
        log.error("cannot bind: %s (is another poold running?)", exc)
        return 1
    except (FastlaneUnavailable, UnsafeDirectory) as exc:
        log.error("%s", exc)
        return 1
    try:
        return daemon.run()
    finally:
        daemon.close()


if __name__ == "__main__":
    sys.exit(main())
