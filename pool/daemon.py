"""poold: one event loop that routes requests, supervises workers and answers pool-ctl.

Signal handlers only enqueue; the loop wakes through ``signal.set_wakeup_fd`` and
handles them in order (TERM/INT: drain and stop, HUP: reload the config, CHLD: reap).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

from gateway.collector import OipCollector
from pool.config import Config, ModelConfig, PoolConfig, ipc_path
from pool.control import ControlServer
from pool.curve_keys import AuthorizedKeys
from pool.dirs import private_dir
from pool.door_metrics import DoorCollector
from pool.events import (
    Event,
    KillAll,
    Poll,
    SpawnerMessage,
    SpawnFailed,
    StopAll,
    Tick,
    WorkerExited,
    WorkerMessage,
    WorkerOverdue,
    WorkerSpawned,
    WorkerUnreachable,
)
from pool.gateways import Gateways, admit_gateways, gateway_specs
from pool.gpu import Gpu
from pool.health import PoolHealth, assess
from pool.http import read_token_file, serve_http
from pool.logs import StderrRelay, relay_wanted
from pool.manage import Manager
from pool.manage_commands import manage_commands
from pool.metrics import (
    LATENCY_BUCKETS,
    PoolMetrics,
    PoolSnapshot,
    StandbySample,
    WorkerSample,
)
from pool.reload import ReloadResult, apply_reload
from pool.rundirs import clean_stale, make_rundir
from pool.sdnotify import Notifier, watchdog_interval
from pool.shell import Shell
from pool.spawn import SpawnerClient
from pool.standby import Standbys
from pool.state import Deployed, StateStore, file_digest
from pool.supervisor import Supervisor
from pool.topology import Topology
from router.door import Door, connection_limit, raise_nofile
from router.router import Router
from router.table import WorkerSlot
from workers.heap import freeze_heap
from workers.spawner import reaped

log = logging.getLogger("poold")

TICK_S = 0.05
PUBLISH_EVERY_S = 1.0
CLOSE_QUIET_S = 0.2  # at shutdown: how long the frontend must be quiet before it closes
CLOSE_WINDOW_S = 2.0  # ... and the longest it stays open for that
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of a dead spawner become our children, so our reaper can reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_CHILD_SUBREAPER) unavailable")


def metrics_token(pool: PoolConfig) -> str:
    """The bearer token /metrics requires ("" = none), from pool.metrics_token_file."""
    if not pool.metrics_token_file:
        return ""
    try:
        return read_token_file(pool.metrics_token_file)
    except ValueError as exc:
        raise SystemExit(f"pool.metrics_token_file: {exc}") from exc


def owner_only_dir(path: str, what: str = "state") -> None:
    """See pool.dirs: created 0700 if missing, refused if unsafe, never re-moded."""
    private_dir(path, what)



# An ipc:// path is limited to 107 bytes (sun_path); ours are rundir + "/backend.sock".
IPC_DIR_MAX = 80


def short_tmp() -> str | None:
    """Where poold's private socket directory goes: $TMPDIR unless its path is too long
    for ipc sockets under it, then /tmp."""
    return None if len(tempfile.gettempdir().encode()) <= IPC_DIR_MAX - 20 else "/tmp"

class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pool = config.pool
        self.signals: collections.deque[int] = collections.deque()
        self.running = True
        self.gpu = Gpu()
        self.metrics = PoolMetrics()
        self.notifier = Notifier.from_env()
        self.ready_sent = False
        self.health_now = PoolHealth((), False)  # replaced by the loop, read by HTTP probes
        self.state_problem = ""  # what StateStore could not write, for health
        self.last_tick = time.monotonic()
        self.gateways = Gateways([], -1)  # the OIP gateways, set up in setup()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        self.nofile = raise_nofile()
        owner_only_dir(self.pool.state_dir)
        for what, endpoint in (("control socket", self.pool.control), ("frontend socket",
                                                                         self.pool.frontend)):
            path = ipc_path(endpoint)
            if path:
                owner_only_dir(os.path.dirname(path), what)
        become_subreaper()
        # The lifeline: workers hold the read end; when poold dies the kernel closes the
        # write end and every worker exits, so no orphan keeps GPU memory.
        self.lifeline_r, self.lifeline_w = os.pipe()
        clean_stale(short_tmp())  # what SIGKILLed pooldes left (pool.rundirs)
        self.rundir = make_rundir(short_tmp())
        backend = f"ipc://{self.rundir}/backend.sock"
        # libzmq's I/O threads do the socket copies (large tensors pass through twice: in
        # from a client, out to a worker), in parallel with the Python loop.
        self.ctx = zmq.Context(io_threads=self.pool.zmq_io_threads())
        curve = self._curve()
        self.router = Router(
            self.ctx,
            self.pool.frontend,
            backend,
            self._events_proxy(),
            request_grace_s=self.pool.request_grace_s,
            max_message_bytes=self.pool.max_message_mb << 20,
            observe=self.metrics.observe_request,
            observe_bulk=self.metrics.observe_requests_bulk,
            latency_bounds=LATENCY_BUCKETS,
            curve_secret_key=curve[1] if curve else None,
            spin_us=self.pool.spin_us(),
            lane=os.path.join(self.rundir, "lane.sock") if self.pool.router_lane else "",
            max_unread_bytes=self.pool.max_unread_reply_mb << 20,
            max_unread_total_bytes=self.pool.max_unread_reply_total_mb << 20,
            observe_rejected=self.metrics.observe_rejected,
        )
        self.door = Door(
            self.router.frontend, connection_limit(self.pool.max_connections, self.nofile)
        )
        self.door_stats = self.door.stats()
        self.peer_stats = self.router.peer_stats()
        self.metrics.registry.register(
            DoorCollector(lambda: self.door_stats, lambda: self.peer_stats)
        )
        self.control_sock = self.ctx.socket(zmq.ROUTER)
        self.control_sock.setsockopt(zmq.LINGER, 0)
        self.control_sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        if curve:
            self.control_sock.curve_server = True
            self.control_sock.curve_secretkey = curve[1]
        self.control_sock.bind(self.pool.control)
        path = ipc_path(self.pool.control)
        if path:
            os.chmod(path, 0o600)
        self.spawner = SpawnerClient(
            self.lifeline_r,
            lambda token, pid: self.feed(WorkerSpawned(token, pid, time.monotonic())),
            lambda pid, status: self.feed(WorkerExited(pid, status, time.monotonic())),
            lambda token, why: self.feed(SpawnFailed(token, why, time.monotonic())),
            lambda msg: self.feed(SpawnerMessage(msg, time.monotonic())),
        )
        # JSON logs must be only JSON, and the journal wants a priority on every line:
        # children's stderr then comes through us as records (see pool.logs).
        self.relay = StderrRelay() if relay_wanted() else None
        if self.relay is not None:
            self.spawner.child_stderr = self.relay.write_fd
        self.spawner.start()
        self.store = StateStore(self.pool.state_dir)
        self.sup = Supervisor(
            self.config,
            Standbys(self.spawner.standby, self.gpu, self.lifeline_r),
            self.store,
            self.gpu,
            self.metrics,
            backend,
            self.router.lane,
            self.lifeline_r,
        )
        self.shell = Shell(
            self.sup, self.router, self.spawner, self.store, self.gpu, self.metrics
        )
        self.roots = self.sup.roots
        self.control = ControlServer(
            self.control_sock, self.sup, self.router, self.spawner, self.roots, self.reload
        )
        self.manager = Manager(self)
        self.control.commands.update(manage_commands(self.manager, self.control))
        # The config names the models; what pool-ctl load/unload/scale did since wins.
        self.topology = Topology(self.pool.state_dir)
        self.feed(Poll(time.monotonic()))  # the supervisor's clock: its first workers' start
        for model in self.topology.apply(self.config.models):
            self.add_model(model)
        self.shell.flush()
        keys = getattr(self, "gateway_keys", None)
        self.gateways = Gateways(
            gateway_specs(self.pool, self.rundir, (curve[0], *keys) if curve and keys else None),
            self.lifeline_r,
        )
        if self.gateways.gateways:
            # The gateways' own way in: an ipc endpoint on the frontend socket, in our
            # private run directory, so an OIP request is an ordinary client request.
            self.router.frontend.bind(f"ipc://{self.rundir}/oip.sock")
            self.gateways.start()
            self.control.gateways = self.gateways.summary
            self.metrics.registry.register(OipCollector(self.rundir, self.gateways.supervision))
        self.http = None
        if self.pool.metrics:
            self.http = serve_http(
                self.pool.metrics, self.metrics, self.health, metrics_token(self.pool)
            )
        self.watchdog_s = watchdog_interval()
        self.last_watchdog = 0.0
        log.info(
            "poold [pid %d] serving %s on %s (up to %d connections of %d descriptors), "
            "control %s",
            os.getpid(),
            ", ".join(m.name for m in self.config.models) or "no models",
            self.pool.frontend,
            self.door.limit,
            self.nofile,
            self.pool.control,
        )

    def _curve(self) -> tuple[bytes, bytes] | None:
        if not (self.pool.curve_secret_key and self.pool.curve_authorized_keys):
            return None
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = zmq.auth.load_certificate(self.pool.curve_secret_key)
        if secret is None:
            raise SystemExit(f"{self.pool.curve_secret_key} holds no secret key")
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        # Asked about every new connection; pool-ctl reload re-reads it (pool.curve_keys).
        self.curve_keys = AuthorizedKeys(self.pool.curve_authorized_keys)
        self.auth.configure_curve_callback("*", self.curve_keys)
        if self.pool.http or self.pool.grpc:
            self.gateway_keys = admit_gateways(self.curve_keys)
        return public, secret

    def feed(self, event: Event) -> None:
        """One event to the supervisor, and what it decided carried out (pool.shell)."""
        self.shell.feed(event)

    def _events_proxy(self) -> Any:
        daemon = self

        class Events:  # the router's callbacks, as events (the supervisor comes later)
            def on_worker_event(self, wid: bytes, event: dict[str, Any]) -> None:
                daemon.feed(WorkerMessage(wid, event, time.monotonic()))

            def on_worker_unreachable(self, wid: bytes) -> None:
                daemon.feed(WorkerUnreachable(wid, time.monotonic()))

            def on_worker_overdue(self, slot: WorkerSlot) -> None:
                daemon.feed(WorkerOverdue(slot.wid, time.monotonic()))

        return Events()

    def add_model(self, model: ModelConfig) -> None:
        devices = model.devices or (("cuda:0",) if self.gpu.count() > 0 else ("cpu",))
        state = self.store.load(model.name)
        cur = state.current
        resume = cur is not None and state.config_path == model.path and os.path.exists(cur.path)
        if resume and cur is not None and file_digest(cur.path) != cur.digest:
            log.error(
                "%s: %s changed on disk since version %s was deployed; starting the "
                "configured model instead",
                model.name,
                cur.path,
                cur.version,
            )
            resume = False
        if resume and cur is not None:
            deployed = cur  # restart on the last committed version
            log.info("%s: resuming committed version %s", model.name, cur.version)
        else:
            digest = file_digest(model.path)
            deployed = Deployed(model.version or digest.split(":")[1][:12], model.path, digest)
            if cur is not None and state.config_path != model.path:
                state.config_path = model.path
                self.store.save(state)
        self.sup.add_model(model, devices, deployed, state)

    # -------------------------------------------------------------- callbacks

    def health(self) -> tuple[bool, bool, str]:
        """For /healthz and /readyz (HTTP thread): reads only the published record.

        Ready while any model serves (degraded, not dead); the body names each model
        and what failed, so a probe log says which model is down and why.
        """
        live = time.monotonic() - self.last_tick < 10.0
        h = self.health_now
        if not live:
            return False, False, "event loop stalled"
        body = h.body() if h.models else "no models"
        if self.state_problem:  # serving, but a restart would not come back on it
            body += f"\ndegraded: state not saved: {self.state_problem}"
        return True, h.any_serving, body

    def reload(self, done: Callable[[ReloadResult], None]) -> None:
        apply_reload(self, done)

    def _reloaded(self, result: ReloadResult) -> None:
        self.notifier.ready("reloaded" if result.ok else "reload failed: " + result.summary())

    # -------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # nothing else: handlers must stay async-signal-safe

    def install_signals(self) -> int:
        r, w = os.pipe()
        os.set_blocking(w, False)
        os.set_blocking(r, False)
        signal.set_wakeup_fd(w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        return r

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig in (signal.SIGTERM, signal.SIGINT):
                if self.running:
                    log.info("received %s: draining and stopping", signal.Signals(sig).name)
                self.running = False
            elif sig == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", self.config.source)
                self.notifier.reloading("reloading configuration")
                # systemd waits for READY=1 after RELOADING=1, whatever the outcome; it
                # comes once everything the reload started has finished.
                self.reload(self._reloaded)
            elif sig == signal.SIGCHLD:
                self.reap()

    def reap(self) -> None:
        """The one reaper for our direct children: the spawner and adopted orphans."""
        for pid, status in reaped():
            if self.gateways.owns(pid):
                self.gateways.on_exited(pid, status)
            elif pid != self.spawner.pid:
                self.feed(WorkerExited(pid, status, time.monotonic()))

    # -------------------------------------------------------------- the loop
    def run(self) -> int:
        wake_r = self.install_signals()
        spawner_fd = self.spawner.fileno()

        def wakeups() -> None:
            # 0: control socket, 1: signal wake-up pipe, 2: the door's monitor,
            # 3: the spawner's pipe (if alive)
            items: list[tuple[zmq.Socket[Any] | None, int]] = [
                (self.control_sock, 0),
                (None, wake_r),
                (self.door.monitor, 0),
            ]
            if spawner_fd is not None:
                items.append((None, spawner_fd))
            self.router.set_wakeups(items)

        wakeups()
        freeze_heap()  # see workers.heap: full collections would pause routing
        next_publish = 0.0
        stopping_since: float | None = None
        while True:
            sched = self.sup.scheduler
            timeout = sched.wake_in_ms(10) if sched.busy() else int(TICK_S * 1000)
            self.router.pump(timeout)
            if self.router.woke(0):
                self.control.handle()
                self.shell.flush()  # what the commands' operations decided
            if self.router.woke(2):
                self.door.handle()
                self.door_stats = self.door.stats()
            if spawner_fd is not None and self.router.woke(3):
                if not self.spawner.handle_readable():
                    spawner_fd = None
                    wakeups()
            if self.router.woke(1):
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            self.handle_signals()
            self.shell.flush()  # a reload's operations
            now = time.monotonic()
            if now - self.last_tick >= TICK_S:
                self.last_tick = now
                self.router.sweep(now)
                self.feed(Tick(now))
                if self.running:
                    self.gateways.tick(now)
                if self.running and self.spawner.maybe_restart(now):
                    spawner_fd = self.spawner.fileno()
                    wakeups()
                self.systemd(now)
            else:
                self.feed(Poll(now))
            if now >= next_publish:
                next_publish = now + PUBLISH_EVERY_S
                self.publish()
            if not self.running:
                stopping_since = self.shutdown_step(stopping_since, now)
                if stopping_since is not None and stopping_since < 0:
                    self.closing_window()
                    return 0

    def shutdown_step(self, since: float | None, now: float) -> float | None:
        """Stop accepting; let in-flight and queued work finish; then stop the workers."""
        if since is None:
            self.notifier.stopping("draining")
            self.router.accepting = False
            self.gateways.stop()  # they finish what is in flight; the router answers it
            return now
        drained = not self.router.inflight_count() and not self.router.queued_count()
        if drained or now - since > self.pool.drain_timeout_s:
            if not getattr(self, "_workers_told", False):
                self._workers_told = True
                self.feed(StopAll(now))
                self.sup.standbys.stop_all()
            limit = self.pool.drain_timeout_s + self.pool.stop_timeout_s + 10
            if self.sup.all_exited() or now - since > limit:
                self.feed(KillAll(now))
                return -1.0
        return since

    def closing_window(self) -> None:
        """Answer SHUTTING_DOWN to whatever still arrives until the frontend has been quiet
        for CLOSE_QUIET_S (at most CLOSE_WINDOW_S), then close it at once: a request read
        is a request answered, and one sent after the close stays in the client's queue
        (it is never half-taken)."""
        start = quiet = time.monotonic()
        seen = self.router.frontend_seen
        while True:
            self.router.pump(10)
            now = time.monotonic()
            if self.router.frontend_seen != seen:
                seen, quiet = self.router.frontend_seen, now
            if now - quiet >= CLOSE_QUIET_S or now - start >= CLOSE_WINDOW_S:
                break
        self.door.close()
        self.router.close()  # flushes the last answers (LINGER)
        log.info("frontend closed")

    def systemd(self, now: float) -> None:
        if self.watchdog_s and now - self.last_watchdog >= self.watchdog_s:
            self.last_watchdog = now
            self.notifier.watchdog()  # from the loop itself: a stuck loop stops the pings
        h = self.health_now = assess(self.sup.models.values())
        if not self.ready_sent and self.running and h.settled:
            # READY once the pool serves what it can: a broken model is named in STATUS
            # instead of holding the healthy ones (and the unit) in "activating".
            self.ready_sent = True
            self.notifier.ready(h.summary())
            for m in h.broken:
                log.error("ready without %s: %s", m.name, m.reason or m.state)
        busy = [f"{rt.busy} of {rt.name} running" for rt in self.sup.models.values() if rt.busy]
        status = h.summary() if self.running else "draining"
        if self.state_problem:
            status += "; degraded: state not saved"
        if busy:
            status = "; ".join(busy) + "; " + status
        if status != getattr(self, "_last_status", None):
            self._last_status = status
            self.notifier.status(status)

    def device_samples(self) -> dict[str, tuple[float | None, int, int]]:
        """NVML utilisation and memory of every GPU, for the per-device gauges."""
        out: dict[str, tuple[float | None, int, int]] = {}
        for idx in range(self.gpu.count()):
            mem = self.gpu.memory(idx)
            if mem is not None:
                out[f"cuda:{idx}"] = (self.gpu.utilization(idx), mem[0], mem[2])
        return out

    def publish(self) -> None:
        self.store.retry()  # a disk that was full or read-only may take the state now
        self.state_problem = self.store.problem()
        self.router.flush_stats()
        self.peer_stats = self.router.peer_stats()  # also forgets connections that left
        workers = []
        for rt in self.sup.models.values():
            for w in rt.workers:
                if w.alive and w.pid:
                    workers.append(
                        WorkerSample(
                            model=w.model,
                            version=w.version,
                            generation=w.generation,
                            device=w.device,
                            state=w.state.value,
                            pid=w.pid,
                            gpu_bytes=w.gpu_bytes,
                            rss_bytes=w.rss,
                            inflight=w.slot_view.load,
                            served=w.slot_view.served,
                        )
                    )
        self.metrics.publish(
            PoolSnapshot(
                workers=tuple(workers),
                queue_depth={
                    rt.name: self.router.queue_len(rt.name) for rt in self.sup.models.values()
                },
                model_state={rt.name: rt.status() for rt in self.sup.models.values()},
                devices=self.device_samples(),
                standbys=tuple(
                    StandbySample(r.device, r.state.value, r.pid, r.gpu_bytes, r.preload_bytes)
                    for r in self.sup.standbys.current.values()
                    if r.alive and r.pid is not None
                ),
                standbys_taken=dict(self.sup.standbys.taken),
                standbys_died=dict(self.sup.standbys.died),
            )
        )

    def close(self) -> None:
        self.gateways.kill()
        self.spawner.stop()
        if self.http is not None:
            self.http.close()
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self.door.close()
        self.router.close()
        self.control_sock.close(linger=0)
        self.ctx.term()
        os.close(self.lifeline_w)
        path = ipc_path(self.pool.control)
        for p in (path, *self.gateways.files(), os.path.join(self.rundir, "backend.sock")):
            try:
                if p:
                    os.unlink(p)
            except OSError:
                pass
        # The directory is ours alone (mkdtemp): whatever is left in it (the lane's
        # socket, a gateway's) goes with it.
        shutil.rmtree(self.rundir, ignore_errors=True)
        log.info("poold stopped")
