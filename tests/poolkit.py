"""Run a real poold in a test: write its config, start it in its own session, wait for
it to serve, talk to it, and always stop it (killpg in teardown)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pool.ctl.client import ControlClient
from pool.tomlwrite import write_config  # noqa: F401  tests import it from here
from router.client import Client
from router.errors import PoolError


def wait_for(
    cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05
) -> Any:
    """Poll until ``cond()`` is truthy; fail the test with ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Pool:
    dir: str
    config: str
    frontend: str
    control: str
    proc: subprocess.Popen[bytes]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    run_dir: str = ""  # poold's TMPDIR (its private sockets), removed by stop()

    def ctl(self, cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return ControlClient(self.control).call(cmd, args, **kw)

    def status(self) -> dict[str, Any]:
        return self.ctl("status")["data"]

    def model(self, name: str) -> dict[str, Any]:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def client(self, **kw: Any) -> Client:
        return Client(self.frontend, **kw)

    def pool_ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pool.ctl.cli", "--control", self.control, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env or None,
        )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_serving(self, timeout: float = 60.0) -> None:
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"poold exited {self.proc.returncode}:\n{self.log()}")
            try:
                data = self.ctl("status")["data"]
            except Exception:
                return False
            return all(
                m["status"] == "serving"
                and all(w["state"] == "ready" for w in m["workers"])
                and m["workers"]
                for m in data["models"]
            )

        wait_for(serving, timeout, "every model serving")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.run_dir:  # also what a SIGKILLed poold could not remove itself
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.proc.returncode


def short_dir() -> str:
    """A fresh directory whose ipc socket paths stay under the 107-byte limit whatever
    $TMPDIR is (/tmp when $TMPDIR itself is long); removed at the latest when the test
    process exits (a test that SIGKILLs its poold may never call ``stop``)."""
    base = tempfile.gettempdir()
    path = tempfile.mkdtemp(prefix="gpt-", dir=base if len(base.encode()) <= 40 else "/tmp")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def in_threads(fn: Callable[[int], None], n: int, timeout: float = 120.0) -> None:
    """Run ``fn(0)`` .. ``fn(n - 1)`` on ``n`` threads at once and wait for them all."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _limit_nofile(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def start_pool(
    tmp: str,
    models: list[dict[str, Any]],
    *,
    wait: bool = True,
    keep_notify: bool = False,
    env_extra: dict[str, str] | None = None,
    nofile: int | None = None,
    **pool_opts: Any,
) -> Pool:
    """``nofile``: start poold as under ``ulimit -n NOFILE`` (soft and hard limit)."""
    os.makedirs(tmp, exist_ok=True)
    # poold's own sockets go in a short directory of this pool's (removed on stop), and
    # so do the test's when ``tmp`` is too long for the 107-byte ipc path limit.
    run_dir = short_dir()
    socks = tmp if len(tmp.encode()) <= 80 else run_dir
    pool = {
        "frontend": f"ipc://{socks}/front.sock",
        "control": f"ipc://{socks}/ctl.sock",
        "state_dir": f"{tmp}/state",
        "metrics": "",
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 10.0,
        "drain_timeout_s": 10.0,
        "stop_timeout_s": 3.0,
        # The watch window (pool.watch) at its production length would add seconds to
        # every upgrade a test makes without traffic.
        "watch_s": 1.0,
        **pool_opts,
    }
    config = write_config(os.path.join(tmp, "pool.toml"), pool, models)
    log_path = os.path.join(tmp, "poold.log")
    env = dict(os.environ)
    if not keep_notify:
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
    env["TMPDIR"] = run_dir
    env.update(env_extra or {})
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pool.poold", "--config", config],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
        preexec_fn=(lambda: _limit_nofile(nofile)) if nofile else None,  # noqa: PLW1509
    )
    log.close()
    p = Pool(tmp, config, pool["frontend"], pool["control"], proc, log_path, env, run_dir)
    if wait:
        try:
            p.wait_serving()
        except BaseException:
            print("\n".join(p.log().splitlines()[-40:]))
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a daemon behind a failed start
            raise
    return p


@contextmanager
def running_pool(tmp: str, models: list[dict[str, Any]], **kw: Any) -> Iterator[Pool]:
    p = start_pool(tmp, models, **kw)
    try:
        yield p
    except BaseException:
        print(f"--- poold log ({p.log_path}), last 60 lines ---")
        print("\n".join(p.log().splitlines()[-60:]))
        raise
    finally:
        p.stop()
        try:
            os.killpg(p.proc.pid, signal.SIGKILL)  # anything left of its session
        except ProcessLookupError:
            pass


class Load:
    """Clients sending without pause on threads; every answer is checked and recorded."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        clients: int,
        check: Callable[[np.ndarray, Any], str | None] | None = None,
        make_input: Callable[[int], np.ndarray] | None = None,
        timeout: float = 30.0,
        allowed: frozenset[str] = frozenset(),
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.check = check
        self.make_input = make_input or (lambda i: np.full((1, 16), i % 7, np.float32))
        self.timeout = timeout
        self.allowed = allowed  # error codes a test accepts (e.g. WORKER_LOST when retries are off)
        self.stop_flag = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.allowed_errors: dict[str, int] = {}
        self.versions: list[list[str]] = [[] for _ in range(clients)]
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(60)

    def _run(self, idx: int) -> None:
        client = Client(self.endpoint, retries=1, timeout=self.timeout)
        i = 0
        try:
            while not self.stop_flag.is_set():
                x = self.make_input(idx * 100_000 + i)
                i += 1
                try:
                    r = client.infer(self.model, x)
                except PoolError as exc:
                    with self.lock:
                        if exc.code in self.allowed:
                            self.allowed_errors[exc.code] = self.allowed_errors.get(exc.code, 0) + 1
                        else:
                            self.errors.append(f"client {idx}: {exc}")
                    continue
                problem = self.check(x, r) if self.check else None
                with self.lock:
                    if problem:
                        self.errors.append(f"client {idx}: {problem}")
                    else:
                        self.ok += 1
                    self.versions[idx].append(r.version)
        finally:
            client.close()

    def wait_ok(self, n: int, timeout: float = 60.0) -> None:
        start = self.ok
        wait_for(lambda: self.ok >= start + n, timeout, f"{n} more answers")
