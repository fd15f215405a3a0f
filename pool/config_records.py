"""The configuration as typed records, with the defaults an ordinary user gets.

``PoolConfig`` is ``[pool]``, ``ModelConfig`` one ``[[models]]`` entry, ``Config`` the
whole file; every default here is the documented one (``pool.config`` loads and checks
a file into these). The helpers resolve settings a model may take from the pool.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "GPU_POOL_"


def default_state_dir(env: Mapping[str, str] | None = None) -> str:
    """``$XDG_STATE_HOME/gpu-pool``, else ``~/.local/state/gpu-pool``."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore relative values
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "state")
    return os.path.join(base, "gpu-pool")


def default_control_endpoint(
    state_dir: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """``$GPU_POOL_CONTROL``, else ``ipc://$XDG_RUNTIME_DIR/gpu-pool/control.sock``, else
    ``ipc://<state_dir>/control.sock`` (state_dir: argument, ``$GPU_POOL_STATE_DIR``, default).
    """
    env = os.environ if env is None else env
    if env.get(ENV_PREFIX + "CONTROL"):
        return env[ENV_PREFIX + "CONTROL"]
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return "ipc://" + os.path.join(runtime, "gpu-pool", "control.sock")
    if state_dir is None:
        override = env.get(ENV_PREFIX + "STATE_DIR")
        state_dir = os.path.abspath(override) if override else default_state_dir(env)
    return "ipc://" + os.path.join(state_dir, "control.sock")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str  # absolute
    version: str | None = None  # None: the daemon uses a content digest
    devices: tuple[str, ...] = ()  # (): cuda:0 if a GPU is visible, else cpu
    max_batch: int = 8
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    request_timeout_s: float = 30.0
    retry_on_worker_loss: bool = True
    max_requests: int = 0  # recycle a worker after this many requests (0 = never)
    max_requests_jitter: float = 0.1
    max_rss_mb: int = 0  # 0 = off
    max_gpu_growth_mb: int = 0  # 0 = off
    threads: int | None = None
    # Replay the forward as CUDA graphs, one per batch size (workers/graphs.py): cuts the
    # CPU cost of launching a forward to microseconds, at warm-up time and some memory.
    cuda_graphs: bool = False
    # A hot standby on this model's devices: "auto" | True | False; None: [pool] standby.
    standby: str | bool | None = None
    # The standby keeps this model's serving version loaded on the host (pool.preload):
    # "auto" | True | False; None: [pool] standby_preload.
    standby_preload: str | bool | None = None
    # Confine its workers (workers.sandbox): "auto" | True | False; None: [pool] sandbox.
    sandbox: str | bool | None = None


@dataclass(frozen=True)
class PoolConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    control: str = ""  # "" here means "derive from state_dir", filled in __post_init__
    state_dir: str = field(default_factory=default_state_dir)
    metrics: str = "127.0.0.1:9400"  # "" disables the HTTP endpoint
    model_roots: tuple[str, ...] = ()  # (): see effective_model_roots()
    boot_timeout_s: float = 120.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0  # silent and no CPU used this long: hung
    request_grace_s: float = 5.0
    drain_timeout_s: float = 30.0
    upgrade_timeout_s: float = 600.0
    stop_timeout_s: float = 10.0
    surge_margin_mb: int = 512
    # After a switch, keep the old generation until the new one answered this many
    # requests or this many seconds passed; roll back if it fails far more (pool.watch).
    # 0 for either turns the watch off.
    watch_requests: int = 20
    watch_s: float = 3.0
    max_message_mb: int = 1024  # the largest client message libzmq will accept (MAXMSGSIZE)
    # How long the router keeps polling without sleeping after a message (µs). Off by
    # default: on a 16-core H100 host it cost throughput and latency under load (see
    # docs/PERFORMANCE.md). -1: 200 on hosts with 8+ CPUs, 0 on smaller ones.
    router_spin_us: int = 0
    # Small requests and replies over a unix socket per worker, skipping libzmq's I/O
    # threads (router/fastlane.c, "the lane"); false: the backend socket only.
    router_lane: bool = True
    # libzmq I/O threads (they do the socket copies); 0: auto, one per 4 CPUs, 1 to 4.
    io_threads: int = 0
    # One hot standby per device (workers.standby): "auto" = on for CUDA devices.
    standby: str | bool = "auto"
    # A standby also holds the serving version of its device's model in host memory,
    # loaded ahead (pool.preload): a crash replacement or a spawn then only moves it to
    # the device. One copy of the model in host RAM per standby; "auto": when the file
    # is at most a quarter of the host's available memory.
    standby_preload: str | bool = "auto"
    # Workers confine themselves before loading a model (workers.sandbox): files beyond
    # the model roots, network connections and new privileges out of reach. "auto":
    # where the kernel supports it; true: a worker that cannot be confined refuses to
    # start; false: off.
    sandbox: str | bool = "auto"
    # Client connections the frontend accepts at once (router/door.py); 0: the descriptor
    # limit less a reserve for poold itself.
    max_connections: int = 0
    # Reply bytes a client connection may leave unread in poold (libzmq holds them until
    # the client reads), and all connections together; past either, that connection's
    # new requests are answered OVERLOADED (router/fastlane_peers.h). 0: no bound.
    max_unread_reply_mb: int = 64
    max_unread_reply_total_mb: int = 1024
    curve_secret_key: str | None = None
    curve_authorized_keys: str | None = None
    # Open Inference Protocol endpoints (HOST:PORT; "" = off), served by gateway
    # processes that poold supervises (pool/gateways.py).
    http: str = ""
    grpc: str = ""
    oip_tls_cert: str | None = None
    oip_tls_key: str | None = None
    oip_insecure: bool = False  # allow a non-loopback OIP bind without TLS
    oip_token_file: str | None = None  # a file holding the bearer token clients must send
    # The metrics endpoint follows the same rule: a non-loopback bind needs a bearer token
    # (a file holding it) or metrics_insecure = true, said on purpose.
    metrics_insecure: bool = False
    metrics_token_file: str | None = None
    # gateway processes per protocol (SO_REUSEPORT when > 1); 0 = auto, see gateway_count
    oip_processes: int = 0
    oip_spin_us: int = 0  # each gateway's busy-poll window before its loop sleeps (0: off)
    log_format: str = "text"
    log_level: str = "INFO"

    def gateway_count(self) -> int:
        """``oip_processes`` with 0 (auto) resolved: one process per four usable cores, at
        most four, at least one. One Python gateway is CPU-bound near a few thousand
        requests a second; four cover what the router carries on a 16-core host, and
        the rest of the cores stay with the router, the workers and the clients
        (docs/PERFORMANCE.md)."""
        if self.oip_processes > 0:
            return self.oip_processes
        return max(1, min(4, len(os.sched_getaffinity(0)) // 4))

    def spin_us(self) -> int:
        """The router's busy-poll window after ``router_spin_us`` = -1 is resolved."""
        if self.router_spin_us >= 0:
            return self.router_spin_us
        return 200 if (os.cpu_count() or 1) >= 8 else 0

    def zmq_io_threads(self) -> int:
        if self.io_threads > 0:
            return self.io_threads
        return max(1, min(4, (os.cpu_count() or 2) // 4))

    def __post_init__(self) -> None:
        if not self.control:
            object.__setattr__(self, "control", default_control_endpoint(self.state_dir))


@dataclass(frozen=True)
class Config:
    pool: PoolConfig
    models: tuple[ModelConfig, ...]
    source: str | None  # absolute path of the file; None for defaults


def standby_wanted(pool: PoolConfig, model: ModelConfig, device: str) -> bool:
    """Whether ``model``'s workers on ``device`` take (and keep) a hot standby there."""
    value = pool.standby if model.standby is None else model.standby
    return device.startswith("cuda") if value == "auto" else bool(value)


def sandbox_mode(pool: PoolConfig, model: ModelConfig) -> str | bool:
    """``model``'s sandbox setting ("auto", True or False), the pool's unless it has one."""
    return pool.sandbox if model.sandbox is None else model.sandbox


def effective_model_roots(config: Config) -> tuple[str, ...]:
    """Where upgrades may load from: pool.model_roots, else the directories of the
    configured models plus ``state_dir/demo`` (where the daemon writes its demo model)."""
    if config.pool.model_roots:
        return config.pool.model_roots
    dirs = [os.path.dirname(m.path) for m in config.models]
    dirs.append(os.path.join(config.pool.state_dir, "demo"))
    return tuple(dict.fromkeys(dirs))  # de-duplicated, first-seen order
