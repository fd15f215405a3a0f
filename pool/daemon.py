"""poold: one event loop that routes requests, supervises workers and answers pool-ctl.

Signal handlers only enqueue; the loop wakes through ``signal.set_wakeup_fd`` and
handles them in order (TERM/INT: drain and stop, HUP: reload the config, CHLD: reap).
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq

from gateway.collector import OipCollector
from pool import daemon_loop
from pool.config import Config, ModelConfig, ipc_path
from pool.control import ControlServer
from pool.curve_keys import AuthorizedKeys
from pool.door_metrics import DoorCollector
from pool.events import (
    Event,
    Poll,
    SpawnerMessage,
    SpawnFailed,
    WorkerExited,
    WorkerMessage,
    WorkerOverdue,
    WorkerSpawned,
    WorkerUnreachable,
)
from pool.gateways import Gateways, admit_gateways, gateway_specs
from pool.gpu import Gpu
from pool.health import PoolHealth, assess
from pool.host_files import LocalFiles
from pool.http import serve_http
from pool.logs import StderrRelay, relay_wanted
from pool.manage import Manager
from pool.manage_commands import manage_commands
from pool.metrics import (
    LATENCY_BUCKETS,
    PoolMetrics,
)
from pool.ports import Ports
from pool.process_env import become_subreaper, metrics_token, owner_only_dir, short_tmp
from pool.publish import publish
from pool.reload import ReloadResult, apply_reload
from pool.rundirs import clean_stale, make_rundir
from pool.sdnotify import Notifier, watchdog_interval
from pool.shell import Shell
from pool.spawn import SpawnerClient
from pool.state import Deployed, StateStore, file_digest
from pool.supervisor import Supervisor
from pool.topology import Topology
from pool.worker_wire import decode
from router.door import Door, connection_limit, raise_nofile
from router.router import Router
from router.table import WorkerSlot
from workers.spawner import reaped

log = logging.getLogger("poold")

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
        self.workers_told = False  # shutdown: StopAll was fed

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
            self.router.frontend,
            connection_limit(self.pool.max_connections, self.nofile),
            on_closed=self.router.peer_closed,
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
            Ports(
                store=self.store,
                memory=self.gpu,
                queues=self.router,
                spawner=self.spawner,
                files=LocalFiles(),
            ),
            backend,
            self.router.lane,
            self.lifeline_r,
        )
        self.shell = Shell(
            self.sup, self.router, self.spawner, self.store, self.gpu, self.metrics
        )
        self.roots = self.sup.roots
        self.control = ControlServer(
            self.control_sock,
            self.sup,
            self.router,
            self.spawner,
            self.roots,
            self.reload,
            self.metrics,
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
                # Decoded once, here: the core sees only typed records (pool.worker_wire).
                daemon.feed(WorkerMessage(wid, decode(event), time.monotonic()))

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
        return daemon_loop.run(self)

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

    def publish(self) -> None:
        publish(self)

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
