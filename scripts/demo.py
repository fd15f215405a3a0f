"""A guided tour: start `poold --demo`, serve, upgrade under load, roll back, stop.

Runs in a temporary state directory with its own sockets, so it never disturbs a pool
that is already running. Usage: python scripts/demo.py [--keep] (keep: leave it serving)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from router.client import Client
from router.errors import PoolError


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def ctl(env: dict[str, str], *args: str) -> int:
    cmd = [sys.executable, "-m", "pool.ctl.cli", *args]
    print("$ pool-ctl " + " ".join(args), flush=True)
    return subprocess.run(cmd, env=env).returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="leave poold running at the end")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="gpu-pool-demo-")
    env = dict(
        os.environ,
        XDG_STATE_HOME=os.path.join(home, "state"),
        XDG_RUNTIME_DIR=os.path.join(home, "run"),
        GPU_POOL_FRONTEND=f"ipc://{home}/frontend.sock",
        GPU_POOL_METRICS="",
    )
    os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700)
    frontend = env["GPU_POOL_FRONTEND"]
    step(f"starting poold --demo (state in {home})")
    log = open(os.path.join(home, "poold.log"), "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "pool.poold", "--demo"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = Client(frontend, retries=1, timeout=10)
        t0 = time.monotonic()
        while True:  # the first start imports torch and writes the demo model: seconds
            try:
                r = client.infer("demo", np.ones((1, 16), np.float32))
                break
            except PoolError:
                if daemon.poll() is not None or time.monotonic() - t0 > 120:
                    print(open(log.name).read())
                    return 1
                client = Client(frontend, retries=1, timeout=10)
        print(
            f"serving after {time.monotonic() - t0:.1f}s: version {r.version}, "
            f"output {np.round(r.outputs[0], 4).tolist()}"
        )
        ctl(env, "status")

        step("upgrading demo to version 2 while 4 clients keep calling it")
        stop, failed = threading.Event(), []
        # Versions each client saw, in its own order: across clients, a reply from the
        # draining old worker may still land after another client's first new reply.
        seen: list[list[str]] = [[] for _ in range(4)]

        def caller(mine: list[str]) -> None:
            c = Client(frontend, retries=1, timeout=10)
            while not stop.is_set():
                try:
                    mine.append(c.infer("demo", np.ones((1, 16), np.float32)).version)
                except PoolError as exc:
                    failed.append(str(exc))

        threads = [threading.Thread(target=caller, args=(mine,)) for mine in seen]
        for t in threads:
            t.start()
        v2 = os.path.join(env["XDG_STATE_HOME"], "gpu-pool", "demo", "demo-v2.pt")
        ctl(env, "upgrade", "demo", v2, "--version", "2")
        step("rolling back to version 1, still under load")
        ctl(env, "rollback", "demo")
        stop.set()
        for t in threads:
            t.join()
        orders = sorted(
            {" -> ".join(v for i, v in enumerate(vs) if i == 0 or vs[i - 1] != v) for vs in seen}
        )
        print(
            f"{sum(map(len, seen))} requests during the upgrade and rollback, "
            f"{len(failed)} failed; versions each client saw in order: {'; '.join(orders)}"
        )
        step("history")
        ctl(env, "history", "demo")
        if args.keep:
            print(
                f"\npoold keeps running (pid {daemon.pid}); control socket in "
                f"{env['XDG_RUNTIME_DIR']}/gpu-pool, frontend {frontend}"
            )
            return 0
        step("stopping poold (SIGTERM: drain, stop workers, exit 0)")
        daemon.send_signal(signal.SIGTERM)
        print(f"poold exited {daemon.wait(60)}")
        return 0 if not failed else 1
    finally:
        if not args.keep:
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGKILL)
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
