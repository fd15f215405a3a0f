"""poold's Open Inference Protocol gateways: one process per protocol, supervised.

Each gateway (``python -m gateway``, see gateway/main.py; ``oip_processes`` of them per
protocol, sharing the port through SO_REUSEPORT when more than one) is a child of poold in its own
session, so its crash cannot take the router down and its Python work never runs on the
router's loop. poold's one reaper hands us the exits of our pids (``on_exited``); a
gateway that dies while poold runs is started again after a back-off that doubles from
``RESTART_MIN_S`` to ``RESTART_MAX_S`` and resets once a gateway has stayed up for
``STABLE_S``. At shutdown poold sends SIGTERM (a gateway then stops accepting and
finishes what it has in flight, whose answers the draining router still sends), and
SIGKILL to whatever is left when poold closes.

A gateway reaches the router through an ipc endpoint that poold binds on its frontend
socket inside its private run directory, and the model contract through the control
endpoint. It holds poold's lifeline pipe as fd 3, so it exits when poold dies.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pool.config import PoolConfig

if TYPE_CHECKING:
    from pool.curve_keys import AuthorizedKeys

log = logging.getLogger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0
LIFELINE_FD = 3


class GatewayState(enum.Enum):
    STARTING = "starting"  # spawned, not yet reaped
    WAITING = "waiting"  # exited; restart due at ``restart_at``
    STOPPING = "stopping"  # SIGTERM sent at shutdown
    STOPPED = "stopped"


TRANSITIONS: dict[GatewayState, frozenset[GatewayState]] = {
    GatewayState.STARTING: frozenset({GatewayState.WAITING, GatewayState.STOPPING}),
    GatewayState.WAITING: frozenset({GatewayState.STARTING, GatewayState.STOPPED}),
    GatewayState.STOPPING: frozenset({GatewayState.STOPPED}),
    GatewayState.STOPPED: frozenset(),
}


@dataclass(frozen=True)
class GatewaySpec:
    protocol: str  # "http" | "grpc"
    listen: str  # HOST:PORT
    frontend: str  # the router's ipc endpoint for gateways
    control: str
    stats_path: str
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""
    curve_keys: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    max_body_mb: int = 1024
    reuse_port: bool = False  # several processes share the port (oip_processes > 1)
    spin_us: int = 0  # busy-poll before the loop sleeps (gateway/spin_loop.py)

    def argv(self) -> list[str]:
        args = [
            sys.executable, "-m", "gateway",
            "--protocol", self.protocol, "--listen", self.listen,
            "--frontend", self.frontend, "--control", self.control,
            "--stats", self.stats_path, "--lifeline-fd", str(LIFELINE_FD),
            "--log-level", self.log_level, "--log-format", self.log_format,
            "--max-body-mb", str(self.max_body_mb),
        ]  # fmt: skip
        if self.reuse_port:
            args.append("--reuse-port")
        if self.spin_us:
            args += ["--spin-us", str(self.spin_us)]
        for flag, value in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--token-file", self.token_file),
            ("--curve-keys", self.curve_keys),
        ):
            if value:
                args += [flag, value]
        return args


@dataclass
class Gateway:
    spec: GatewaySpec
    state: GatewayState = GatewayState.WAITING
    pid: int = 0
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = RESTART_MIN_S
    restarts: int = 0
    history: list[str] = field(default_factory=list)

    def to(self, new: GatewayState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"gateway {self.spec.protocol}: {self.state.value} -> {new.value}")
        self.state = new


class Gateways:
    def __init__(self, specs: list[GatewaySpec], lifeline_r: int) -> None:
        self.lifeline_r = lifeline_r
        self.gateways = [Gateway(s) for s in specs]

    def start(self) -> None:
        for gw in self.gateways:
            self._spawn(gw, time.monotonic())

    def _spawn(self, gw: Gateway, now: float) -> None:
        try:
            pid = os.posix_spawn(
                sys.executable,
                gw.spec.argv(),
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, self.lifeline_r, LIFELINE_FD)],
                setsid=True,
            )
        except OSError as exc:
            log.error("cannot start the %s gateway: %s", gw.spec.protocol, exc)
            gw.restart_at = now + gw.backoff_s
            return
        gw.to(GatewayState.STARTING)
        gw.pid, gw.started_at = pid, now
        log.info("OIP %s gateway [pid %d] starting on %s", gw.spec.protocol, pid, gw.spec.listen)

    def owns(self, pid: int) -> bool:
        return any(gw.pid == pid and pid for gw in self.gateways)

    def on_exited(self, pid: int, status: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for gw in self.gateways:
            if gw.pid != pid or not pid:
                continue
            gw.pid = 0
            how = _describe_status(status)
            if gw.state is GatewayState.STOPPING:
                gw.to(GatewayState.STOPPED)
                log.info("OIP %s gateway [pid %d] stopped (%s)", gw.spec.protocol, pid, how)
                return
            if now - gw.started_at >= STABLE_S:
                gw.backoff_s = RESTART_MIN_S
            gw.to(GatewayState.WAITING)
            gw.restart_at = now + gw.backoff_s
            log.error(
                "OIP %s gateway [pid %d] exited (%s); restarting in %.1fs",
                gw.spec.protocol, pid, how, gw.backoff_s,
            )  # fmt: skip
            gw.backoff_s = min(RESTART_MAX_S, gw.backoff_s * 2)
            gw.history.append(how)

    def tick(self, now: float) -> None:
        for gw in self.gateways:
            if gw.state is GatewayState.WAITING and now >= gw.restart_at:
                gw.restarts += 1
                self._spawn(gw, now)

    def stop(self) -> None:
        """Shutdown has begun: ask each gateway to finish and exit; start no more."""
        for gw in self.gateways:
            if gw.state is GatewayState.STARTING:
                gw.to(GatewayState.STOPPING)
                _signal(gw.pid, signal.SIGTERM)
            elif gw.state is GatewayState.WAITING:
                gw.to(GatewayState.STOPPED)

    def stopped(self) -> bool:
        return all(gw.state is GatewayState.STOPPED for gw in self.gateways)

    def kill(self, grace_s: float = 2.0) -> None:
        """poold is closing: wait a little for the gateways, then SIGKILL and reap them."""
        self.stop()
        end = time.monotonic() + grace_s
        for gw in self.gateways:
            while gw.pid and time.monotonic() < end:
                if _reap(gw.pid):
                    gw.pid = 0
                    break
                time.sleep(0.02)
            if gw.pid:
                _signal(gw.pid, signal.SIGKILL)
                try:
                    os.waitpid(gw.pid, 0)
                except ChildProcessError:
                    pass
                gw.pid = 0
            if gw.state is not GatewayState.STOPPED:
                gw.to(GatewayState.STOPPED)

    def files(self) -> list[str]:
        """What the gateways leave in the run directory, for poold to remove."""
        out = []
        for gw in self.gateways:
            out += [gw.spec.stats_path, gw.spec.frontend.removeprefix("ipc://")]
            if gw.spec.curve_keys:
                out.append(gw.spec.curve_keys)
        return list(dict.fromkeys(out))

    def summary(self) -> list[dict[str, Any]]:
        """One entry per gateway process slot, for ``pool-ctl status``."""
        return [
            {
                "protocol": gw.spec.protocol,
                "listen": gw.spec.listen,
                "pid": gw.pid or None,
                "state": gw.state.value,
                "up": gw.state is GatewayState.STARTING and bool(gw.pid),
                "restarts": gw.restarts,
                "last_exit": gw.history[-1] if gw.history else None,
            }
            for gw in self.gateways
        ]

    def supervision(self) -> dict[str, tuple[int, int]]:
        """{protocol: (processes running, restarts)} for the metrics."""
        out: dict[str, tuple[int, int]] = {}
        for gw in self.gateways:
            running, restarts = out.get(gw.spec.protocol, (0, 0))
            up = int(gw.state is GatewayState.STARTING)
            out[gw.spec.protocol] = (running + up, restarts + gw.restarts)
        return out


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # poold's reaper already took it
    return done == pid


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def gateway_specs(
    pool: PoolConfig, rundir: str, curve: tuple[bytes, bytes, bytes] | None = None
) -> list[GatewaySpec]:
    """One spec per configured protocol. ``curve``: (poold's public key, the gateways'
    public and secret keys) when the frontend and control sockets use CURVE."""
    keys = ""
    if curve is not None and (pool.http or pool.grpc):
        keys = os.path.join(rundir, "oip.keys")
        fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\n".join(curve) + b"\n")
    specs = []
    n = pool.gateway_count()
    for protocol, listen in (("http", pool.http), ("grpc", pool.grpc)):
        for i in range(n if listen else 0):
            specs.append(
                GatewaySpec(
                    protocol=protocol,
                    listen=listen,
                    frontend=f"ipc://{rundir}/oip.sock",
                    control=pool.control,
                    stats_path=os.path.join(rundir, f"oip-{protocol}-{i}.json"),
                    reuse_port=n > 1,
                    tls_cert=pool.oip_tls_cert or "",
                    tls_key=pool.oip_tls_key or "",
                    token_file=pool.oip_token_file or "",
                    curve_keys=keys,
                    log_level=pool.log_level,
                    log_format=pool.log_format,
                    max_body_mb=pool.max_message_mb,
                    spin_us=pool.oip_spin_us,
                )
            )
    return specs


def admit_gateways(keys: AuthorizedKeys) -> tuple[bytes, bytes]:
    """Make a key pair for this run's gateways and admit it beside the authorized keys.
    Returns (public, secret); never written outside the run dir."""
    import zmq

    public, secret = zmq.curve_keypair()
    keys.admit_own(public)
    return public, secret
