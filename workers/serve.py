"""Inside the worker: load, warm, validate, then serve batches until told to stop."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from typing import Any

import torch
import zmq

from pool.contract import Contract, InputSignature
from workers.copier import Copier, new_copier
from workers.intake import Intake
from workers.lane import Lane
from workers.launcher import Launcher
from workers.loader import LoadedModel
from workers.main import EXIT_OK, WorkerSpec, rss_bytes, send_event
from workers.manifest import Manifest
from workers.pacing import LaunchClock
from workers.pipeline import Completions, Gather, Launched
from workers.preload import Preloaded
from workers.probe import ProbeError, signatures_from_wire
from workers.receive import Receiver
from workers.replies import Replier
from workers.sandbox import SandboxReport
from workers.startup import arena_row_bytes, flush_after_ready, learn_contract, start
from workers.warmup import WarmupError, example_inputs, warm_up

log = logging.getLogger(__name__)

MAX_SHAPES_KEPT = 8  # input signatures remembered for the next version's warm-up
# Gathers in the ring: one running on the device, one queued behind it, one taking
# requests (see Worker.serve).
GATHERS = 3
POLL_TICK_S = 0.001  # zmq_poll's timeout resolution


# Copy each request into the pinned staging arena as it arrives ("1") or when its batch
# is launched ("0"). Default: on arrival on a GPU (the copy overlaps the running
# forward), at launch on a CPU (nothing runs meanwhile, and a request that runs alone
# is then passed to the model without any copy). Tests set it to run the GPU's host
# path on a CPU.
STAGE_ON_ARRIVAL_ENV = "GPU_POOL_STAGE_ON_ARRIVAL"


class Worker:
    def __init__(
        self, spec: WorkerSpec, sock: zmq.Socket[Any], preloaded: Preloaded | None = None
    ) -> None:
        self.spec = spec
        self.sock = sock
        self.preloaded = preloaded  # read ahead by the standby this worker was
        # Owns the model, the device and the graphs once loaded (workers.launcher).
        self.launcher = Launcher(spec.wid, spec.max_batch)
        self.replies = Replier(sock, spec.model, spec.version)
        self.gathers = tuple(Gather(self.device) for _ in range(GATHERS))
        self.clock = LaunchClock()
        self.queued_launches = 0  # launched behind a running batch (see workers.pacing)
        self.stage_on_arrival = False
        self.intake = Intake(
            spec.model,
            lambda: self.model.num_inputs if self.model else None,
            self.replies.error,
        )
        self.receiver = Receiver(spec.wid, sock, self.intake, self.replies)
        self.stopping = False
        self.last_beat = 0.0
        self.copier: Copier | None = None
        self.graph_info: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        self.contract: Contract | None = None  # this version's, once known
        self.contract_failed = False  # its probe on served inputs failed: not retried
        self.sandbox: SandboxReport | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self.launcher.model

    @model.setter
    def model(self, model: LoadedModel | None) -> None:
        self.launcher.model = model

    @property
    def lane(self) -> Lane | None:
        """Small requests from the router (``workers.lane``); the replier answers on it."""
        return self.replies.lane

    @lane.setter
    def lane(self, lane: Lane | None) -> None:
        self.replies.lane = lane

    @property
    def device(self) -> torch.device:
        return self.launcher.device

    @device.setter
    def device(self, device: torch.device) -> None:
        self.launcher.device = device

    # ------------------------------------------------------------------ start-up
    def event(self, kind: str, **fields: Any) -> None:
        send_event(self.sock, {"t": kind, "pid": os.getpid(), "wid": self.spec.wid, **fields})

    def loaded_bytes(self, done: int, total: int) -> None:
        self.event("phase", phase="loading", bytes=done, total=total)

    def main(self) -> int:
        """Start up (``workers.startup``), say "ready", serve until told to stop."""
        code = start(self)
        if code is not None:
            return code  # failed, or told to stop before "go"
        flush_after_ready()
        self.serve()
        self.event("bye", served=self.replies.served)
        return EXIT_OK

    def warmup_signatures(self) -> list[InputSignature]:
        """The supervisor's warm-up signatures (typed on the wire: ``pool.contract``)."""
        return signatures_from_wire(self.spec.warmup_signatures, self.spec.wid)

    def learn_contract(
        self, sets: list[list[torch.Tensor]], seen: list[list[torch.Tensor]], source: str
    ) -> None:
        """This version's contract (``workers.startup.learn_contract``)."""
        assert self.model is not None
        self.contract = learn_contract(self.launcher, self.model, self.manifest, sets, seen, source)

    def learn_from_traffic(self) -> None:
        """No warm-up inputs were known at start: probe the contract once, on synthetic
        inputs of the signatures served so far, and report it."""
        seen = self.replies.shapes
        if self.contract is not None or self.model is None or not seen:
            return
        served = sorted(seen, key=seen.__getitem__, reverse=True)[:MAX_SHAPES_KEPT]
        sets = example_inputs(None, [InputSignature.of(s) for s in served], self.device)
        outputs: list[list[torch.Tensor]] = []
        try:
            warm_up(self.model, sets, outputs)
            self.learn_contract(sets, outputs, "traffic")
        except (WarmupError, ProbeError) as exc:
            log.warning("worker %s: contract probe failed: %s", self.spec.wid, exc)
            self.contract_failed = True
            return
        if self.contract is not None:
            self.event("contract", contract=self.contract.to_json())

    def prepare_staging(
        self, sets: list[list[torch.Tensor]], on_arrival: bool | None = None
    ) -> None:
        """The gathers on this device, their arenas sized for a full batch of the warm-up
        inputs, so that serving starts without allocating pinned memory. Staged on
        arrival (``on_arrival``, default: see STAGE_ON_ARRIVAL_ENV), the copies run on
        threads of their own (``workers.copier``)."""
        env = os.environ.get(STAGE_ON_ARRIVAL_ENV, "")
        if on_arrival is None:
            on_arrival = env == "1" if env in ("0", "1") else self.device.type == "cuda"
        self.stage_on_arrival = on_arrival
        if self.copier is not None:
            self.copier.close()
        self.copier = new_copier() if on_arrival else None
        self.gathers = tuple(Gather(self.device, self.copier) for _ in range(GATHERS))
        per_row = arena_row_bytes(sets)
        try:
            for gather in self.gathers:
                gather.stager.reserve(per_row * max(1, self.spec.max_batch))
        except RuntimeError as exc:  # no pinned memory now: the arenas grow when used
            log.warning("worker %s: staging arenas not reserved: %s", self.spec.wid, exc)

    def fail(self, stage: str, exc: BaseException, code: int) -> int:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("worker %s: %s failed: %s", self.spec.wid, stage, reason)
        self.event("failed", stage=stage, reason=reason[:2000])
        return code

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------- serving
    def serve(self) -> None:
        """Take requests, launch batches, answer them; heartbeats between.

        On a GPU the loop is a pipeline over three gathers: while batch k's forward
        runs (its inputs copied to the device from one gather's pinned arena, its
        outputs copied back into pinned memory, an event recorded after them), requests
        for batch k+1 are received, decoded and copied into the next gather's arena.
        Batch k+1 is launched, queued behind k on the device, shortly before k is due
        to end (``workers.pacing``), or when it is full; requests arriving after that
        go to the third gather. A batch is launched on an idle device when it is full,
        ``max_delay_ms`` after its first request, or at once if it took requests while
        the device was busy (they have waited for company already). At most two
        batches are launched and unanswered at a time, the router's credit, so a gather
        is reused only after its batch was answered. On a CPU the forward completes
        when it is launched, and the loop is the plain take-run-answer cycle.
        """
        sock = self.sock
        max_batch = max(1, self.spec.max_batch)
        delay = self.spec.max_delay_ms / 1000.0
        interval = self.spec.heartbeat_interval_s
        ring = self.gathers
        turn = 0
        gather = ring[0]
        # Replaying a CUDA graph takes microseconds: the next batch is launched before
        # a completed one is answered, so the device is busy meanwhile (answers read
        # host copies of the outputs, never an arena). An ordinary forward takes
        # milliseconds of CPU to launch: answering first lets those clients send their
        # next requests meanwhile.
        launcher = self.launcher
        launch_first = launcher.graphs is not None
        depth = 2 if launcher.asynchronous else 1
        launched: deque[Launched] = deque()
        previous: Launched | None = None  # the batch completed last
        clock = self.clock
        completions = Completions() if launcher.asynchronous else None
        take_or_wake = zmq.Poller()  # requests, or the running batch completing
        take_or_wake.register(sock, zmq.POLLIN)
        wake_only = zmq.Poller()  # the next batch is full: only completion matters
        if completions is not None:
            take_or_wake.register(completions.fd, zmq.POLLIN)
            wake_only.register(completions.fd, zmq.POLLIN)
        lane_fd = self.lane.fileno() if self.lane is not None else -1
        if lane_fd >= 0:
            take_or_wake.register(lane_fd, zmq.POLLIN)
        self.beat()
        try:
            while not self.stopping:
                done: list[Launched] = []
                while launched and self.completed(launched[0]):
                    finished = launched.popleft()
                    clock.completed(finished, previous, time.monotonic())
                    previous = finished
                    if launch_first:
                        done.append(finished)
                    else:
                        self.finish(finished)
                    if gather.requests and not launched:
                        # These waited for company while the device was busy: waiting
                        # longer would only leave it idle.
                        gather.since = -math.inf
                now = time.monotonic()
                launch_at = self.launch_time(gather, launched, depth, max_batch, delay)
                due = launch_at is not None and now >= launch_at
                if launch_at is not None and launched and not due and launch_at - now < POLL_TICK_S:
                    # Less than a poll tick to go (a poll would round it to a tick):
                    # sleep it off, then take whatever arrived meanwhile.
                    time.sleep(launch_at - now)
                    due = True
                if due:
                    if launched:
                        self.take(gather, max_batch)  # the last arrivals join it
                        self.queued_launches += 1
                    started = time.monotonic()
                    batch = launcher.launch(gather)
                    if batch.event is None and not launched and not launch_first:
                        # It ran as it was launched (on a CPU): answer it now and take
                        # the next requests into the same gather.
                        self.finish(batch)
                        gather.reset()
                        continue
                    batch.at = started
                    batch.queued = bool(launched)
                    clock.launched(started, time.monotonic())
                    launched.append(batch)
                    if completions is not None and batch.event is not None:
                        completions.watch(batch.event)
                    turn = (turn + 1) % len(ring)
                    gather = ring[turn]
                    gather.reset()  # its batch was answered: at most two are pending
                for finished in done:
                    self.finish(finished)
                if done or due:
                    continue
                wait_ms = math.ceil((self.last_beat + interval - now) * 1000)
                if launch_at is not None:
                    ms = (launch_at - now) * 1000  # behind a batch: never late (see above)
                    wait_ms = min(wait_ms, int(ms) if launched else math.ceil(ms))
                full = gather.rows >= max_batch
                ready = (wake_only if full else take_or_wake).poll(max(0, wait_ms))
                for what, _ in ready:
                    if what is sock or what == lane_fd:
                        self.take(gather, max_batch, launched[0] if launched else None)
                    elif completions is not None:
                        completions.clear()
                if lane_fd >= 0 and not (self.lane and self.lane.open):
                    take_or_wake.unregister(lane_fd)  # closed: the backend socket only
                    lane_fd = -1
                if time.monotonic() - self.last_beat >= interval:
                    self.beat()
            # Told to stop: answer everything already taken, and what came down the
            # lane before the stop (the two ways are not ordered with each other).
            while launched:
                self.complete(launched.popleft())
            while True:
                if gather.requests:
                    self.complete(launcher.launch(gather))
                    gather.reset()
                self.take(gather, max_batch)
                if not gather.requests:
                    break
        finally:
            if completions is not None:
                completions.close()
            if self.copier is not None:
                self.copier.close()
                self.copier = None
            if self.lane is not None:
                self.lane.close()

    def launch_time(
        self,
        gather: Gather,
        launched: deque[Launched],
        depth: int,
        max_batch: int,
        delay: float,
    ) -> float | None:
        """When ``gather`` is to be launched (at once: -inf); None: not yet (empty, or
        as many batches pending as the pipeline holds)."""
        if not gather.requests or len(launched) >= depth:
            return None
        if gather.rows >= max_batch:
            return -math.inf
        if not launched:
            return gather.since + delay
        # Behind the running batch, shortly before it is due to end; when its length
        # cannot be told yet, once it completed (the loop comes back then).
        running = launched[-1]
        return self.clock.launch_at(running.rows, running.at)

    def completed(self, launched: Launched) -> bool:
        try:
            return launched.done()
        except Exception as exc:  # a device error (sticky in CUDA): nothing will run again
            self.replies.fail(launched, exc)
            raise

    def complete(self, launched: Launched) -> None:
        try:
            launched.wait()
        except Exception as exc:
            self.replies.fail(launched, exc)
            raise
        self.finish(launched)

    def beat(self) -> None:
        self.last_beat = time.monotonic()
        if self.contract is None and not self.contract_failed:
            self.learn_from_traffic()
        seen = self.replies.shapes
        shapes = sorted(seen, key=seen.__getitem__, reverse=True)[:MAX_SHAPES_KEPT]
        batches = self.launcher.take_batch_sizes()
        self.event(
            "hb",
            served=self.replies.served,
            model_errors=self.replies.model_errors,
            rss=rss_bytes(),
            # Typed records (pool.contract), most served first.
            signatures=[InputSignature.of(s).to_wire() for s in shapes],
            # [rows per forward, count] since the last beat, for the batch-size metric
            # (pairs, not a map: the router decodes maps with string keys only).
            batches=[[size, n] for size, n in batches.items()],
        )

    def take(self, gather: Gather, max_batch: int, running: Launched | None = None) -> None:
        """Receive what waits (``workers.receive``); a "stop" among it ends the loop."""
        if self.receiver.take(gather, max_batch, running, self.stage_on_arrival):
            self.stopping = True

    def finish(self, launched: Launched) -> None:
        """Answer every request of a completed launch (``workers.replies``)."""
        self.replies.finish(launched)
