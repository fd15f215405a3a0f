"""Inside the worker: load, warm, validate, then serve batches until told to stop."""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from collections import deque
from typing import Any

import torch
import zmq

from pool.contract import Contract, InputSignature
from router import protocol as p
from router.frames import recv_frames
from workers import weights
from workers.copier import Copier, new_copier
from workers.graphs import capture_graphs
from workers.intake import Intake
from workers.lane import Lane, LaneError
from workers.launcher import Launcher
from workers.load_progress import LoadMeter
from workers.loader import LoadedModel, ModelLoadError, load_model
from workers.main import (
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_SANDBOX_FAILED,
    EXIT_VALIDATION_FAILED,
    EXIT_WARMUP_FAILED,
    WorkerSpec,
    rss_bytes,
    send_event,
)
from workers.manifest import Manifest, ManifestError, load_manifest
from workers.pacing import LaunchClock
from workers.pipeline import Completions, Gather, Launched
from workers.preload import Preloaded
from workers.probe import ProbeError, contract_of, signatures_from_wire
from workers.replies import Replier
from workers.sandbox import SandboxError, SandboxReport, confine
from workers.schema import forward_schema, warmup_sets
from workers.staged import stage_model
from workers.staging import ALIGN
from workers.warmup import (
    ValidationError,
    WarmupError,
    example_inputs,
    served_sets,
    validate,
    warm_up,
)

log = logging.getLogger(__name__)

MAX_SHAPES_KEPT = 8  # input signatures remembered for the next version's warm-up
# Gathers in the ring: one running on the device, one queued behind it, one taking
# requests (see Worker.serve).
GATHERS = 3
POLL_TICK_S = 0.001  # zmq_poll's timeout resolution


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


# Copy each request into the pinned staging arena as it arrives ("1") or when its batch
# is launched ("0"). Default: on arrival on a GPU (the copy overlaps the running
# forward), at launch on a CPU (nothing runs meanwhile, and a request that runs alone
# is then passed to the model without any copy). Tests set it to run the GPU's host
# path on a CPU.
STAGE_ON_ARRIVAL_ENV = "GPU_POOL_STAGE_ON_ARRIVAL"
# "0": free pinned load buffers (the weights ring, drain-first's staged copy) before
# "ready", as before; default: after it, on a thread of their own (flush_after_ready).
DEFER_HOST_FREE_ENV = "GPU_POOL_DEFER_HOST_FREE"


def flush_after_ready() -> None:
    """Give back the pinned memory the load deferred, off the serving thread: unpinning
    (cudaFreeHost) of a staged model takes tens of milliseconds or more."""
    if not weights.defer_host_frees(False):
        return  # nothing was deferred
    threading.Thread(target=weights.flush_host_frees, name="host-free", daemon=True).start()


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
        spec = self.spec
        self.event("hello", model=spec.model, version=spec.version, device=spec.device)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        if spec.spawned_at:  # CLOCK_MONOTONIC is the machine's: poold's clock too
            timings["to_main_s"] = t0 - spec.spawned_at
        if spec.device.startswith("cuda"):
            self.device = torch.device("cuda", 0)
            torch.cuda.init()
            torch.empty(1, device=self.device)
            torch.cuda.synchronize()
            timings["cuda_init_s"] = time.monotonic() - t0
        # The spawner imported torch with one thread; pick the real count here. A GPU
        # worker needs few CPU threads: the forward runs on the device.
        cpu_threads = default_threads() if self.device.type == "cpu" else min(4, default_threads())
        torch.set_num_threads(spec.threads or cpu_threads)
        # Confined before the model is read: a model is code, from its first byte on
        # (a pickle runs as it loads). CUDA is up, so the device files are open already.
        t_conf = time.monotonic()
        pre, self.preloaded = self.preloaded, None
        try:
            if pre is not None and pre.sandbox is not None:
                self.sandbox = pre.sandbox  # the standby confined itself before its preload
            else:
                self.sandbox = confine(spec.sandbox, spec.model_roots, spec.path, spec.device)
        except SandboxError as exc:
            return self.fail("sandbox", exc, EXIT_SANDBOX_FAILED)
        timings["confine_s"] = time.monotonic() - t_conf
        if self.device.type == "cuda" and os.environ.get(DEFER_HOST_FREE_ENV, "1") != "0":
            weights.defer_host_frees()  # given back after "ready" (flush_after_ready)
        self.event("phase", phase="loading")
        t1 = time.monotonic()
        try:
            roots = spec.model_roots or None  # none sent (a test's worker): its own dir
            manifest = self.manifest = load_manifest(spec.path, roots)
            staged = pre.take(spec) if pre is not None else None
            if staged is not None:
                timings["preloaded"] = 1.0  # read by the standby ahead of need
            if spec.hold_device:
                if staged is None:
                    meter = LoadMeter.for_file(spec.path, self.loaded_bytes)
                    meter.start()
                    pin = self.device.type == "cuda"
                    staged = stage_model(spec.path, manifest, pin, meter.add)
                    meter.finish()
                timings["staged_s"] = time.monotonic() - t1
                self.event("phase", phase="staged", staged_s=timings["staged_s"])
                if not self.wait_for_go():
                    return EXIT_OK
                t1 = time.monotonic()
                self.model = staged.to_device(self.device)
                timings["to_device_s"] = time.monotonic() - t1
            elif staged is not None:
                self.model = staged.to_device(self.device)
                timings["to_device_s"] = time.monotonic() - t1
            else:
                meter = LoadMeter.for_file(spec.path, self.loaded_bytes)
                meter.start()
                self.model = load_model(spec.path, self.device, manifest, meter.add)
                meter.finish()
            self.sync()
            weights.release_ring()  # pinned by a standby for a load that may not use it
        except (ModelLoadError, ManifestError, OSError) as exc:
            return self.fail("load", exc, EXIT_LOAD_FAILED)
        except Exception as exc:  # a broken model file can raise anything from torch
            return self.fail("load", exc, EXIT_LOAD_FAILED)
        timings["load_s"] = time.monotonic() - t1
        self.event("phase", phase="warming")
        try:
            signatures = self.warmup_signatures()
            sets, source = warmup_sets(self.model, manifest, signatures, self.device)
            seen: list[list[torch.Tensor]] = []
            timings["warm_s"] = warm_up(self.model, sets, seen)
            sets += served_sets(self.model, manifest, signatures, self.device, seen)
        except WarmupError as exc:
            return self.fail("warmup", exc, EXIT_WARMUP_FAILED)
        t_probe = time.monotonic()
        try:
            self.learn_contract(sets, seen, source)
        except ProbeError as exc:
            return self.fail("warmup", exc, EXIT_WARMUP_FAILED)
        timings["probe_s"] = time.monotonic() - t_probe
        if manifest is not None and manifest.golden:
            self.event("phase", phase="validating")
            t3 = time.monotonic()
            try:
                validate(self.model, manifest)
            except ValidationError as exc:
                return self.fail("validate", exc, EXIT_VALIDATION_FAILED)
            timings["validate_s"] = time.monotonic() - t3
        if spec.cuda_graphs and self.device.type == "cuda":
            t4 = time.monotonic()
            self.capture(sets)
            timings["graphs_s"] = time.monotonic() - t4
        t_arena = time.monotonic()
        self.prepare_staging(sets)
        timings["arenas_s"] = time.monotonic() - t_arena
        if spec.lane:
            # Before "ready", so the router mostly has the lane before it routes to us
            # (until it does, everything comes on the backend socket).
            self.lane = Lane.connect(spec.lane, spec.wid)
        gpu = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        timings["main_to_ready_s"] = time.monotonic() - t0
        self.event(
            "ready",
            timings=timings,
            # Objects kept out of garbage collection: the torch import, frozen by the
            # spawner before it forked this process (workers.heap).
            heap_frozen=gc.get_freeze_count(),
            rss=rss_bytes(),
            torch_reserved=gpu,
            num_inputs=self.model.num_inputs,
            graphs=self.graph_info,
            standby=spec.from_standby,
            sandbox=self.sandbox.to_wire() if self.sandbox is not None else None,
            contract=self.contract.to_json() if self.contract is not None else None,
            schema=schema.to_wire() if (schema := forward_schema(self.model)) else None,
            # Last, so the fields above are made before it: poold times the event's way
            # to it (ready_delivery_s).
            sent_at=time.monotonic(),
        )
        flush_after_ready()
        self.serve()
        self.event("bye", served=self.replies.served)
        return EXIT_OK

    def wait_for_go(self) -> bool:
        """Block until poold says "go" (True: the device is ours) or "stop" (False).

        Nothing else can arrive: a worker that has not said "ready" is in no route."""
        while True:
            frames = recv_frames(self.sock, 0)  # blocking
            if frames and frames[0].bytes == p.KIND_CONTROL and len(frames) > 1:
                try:
                    kind = p.unpack_map(frames[1].buffer).get("t")
                except p.ProtocolError:
                    continue
                if kind in ("go", "stop"):
                    return kind == "go"

    def warmup_signatures(self) -> list[InputSignature]:
        """The supervisor's warm-up signatures (typed on the wire: ``pool.contract``)."""
        return signatures_from_wire(self.spec.warmup_signatures, self.spec.wid)

    def learn_contract(
        self, sets: list[list[torch.Tensor]], seen: list[list[torch.Tensor]], source: str
    ) -> None:
        """This version's contract from its warm-up (``workers.probe``); a model whose
        outputs do not follow the batch is served one request per forward from now on."""
        assert self.model is not None
        self.contract = contract_of(self.model, self.manifest, sets, seen, source)
        if self.contract is not None:
            self.launcher.batchable = self.contract.batchable

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

    def capture(self, sets: list[list[torch.Tensor]]) -> None:
        """CUDA graphs of the forward for the warm-up signatures (``workers.graphs``);
        a signature that cannot be captured keeps the ordinary forward."""
        assert self.model is not None
        batchable = self.launcher.batchable  # the contract's, learned just before
        if not batchable:
            log.info(
                "worker %s: the model cannot be batched: CUDA graphs only at the shapes "
                "it was warmed up on, each replayed for requests of exactly that shape",
                self.spec.wid,
            )
        # Signatures left out are reported in the ready event (poold logs them).
        table, problems = capture_graphs(self.model, sets, max(1, self.spec.max_batch), batchable)
        if len(table):
            self.launcher.use_graphs(table)
        self.graph_info = {**table.describe(), "batchable": batchable, "skipped": problems}

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
        per_row = 0
        for inputs in sets:
            row = 0
            for t in inputs:
                rows = int(t.shape[0]) if t.dim() and t.shape[0] else 1
                row += t.numel() * t.element_size() // rows + ALIGN
            per_row = max(per_row, row)
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
        """Receive what waits (see ``receive``); the copies it staged start meanwhile."""
        try:
            self.receive(gather, max_batch, running)
        finally:
            gather.stager.flush()

    def receive(self, gather: Gather, max_batch: int, running: Launched | None) -> None:
        """Receive what is waiting, without blocking, until the gather is full or the
        running batch has completed (the device must not wait while requests are read:
        the completion thread's wake-up needs the GIL, which this loop holds)."""
        sock = self.sock
        stager = gather.stager if self.stage_on_arrival else None
        requests = gather.requests
        event = running.event if running is not None else None
        lane = self.lane if self.lane is not None and self.lane.open else None
        while gather.rows < max_batch:
            if event is not None and event.query():
                return
            frames: list[Any] | None = None
            if lane is not None:
                frames = self.from_lane(lane)
                if frames is None:
                    lane = None  # nothing more there for now
            via_lane = frames is not None
            if frames is None:
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    return
            kind = frames[0].bytes
            if kind == p.KIND_REQUEST and len(frames) >= 3:
                pending = self.intake.decode(frames, stager)
                if pending is not None:
                    if not requests:
                        gather.since = time.monotonic()
                    requests.append(pending)
                    gather.rows += pending.layout.size
                    if via_lane:
                        self.replies.lane_keys.add(pending.key)  # answered the same way
            elif kind == p.KIND_CONTROL:
                self.control(frames)

    def from_lane(self, lane: Lane) -> list[Any] | None:
        try:
            return lane.recv()
        except LaneError as exc:  # only a router bug sends that: the backend socket only
            log.error("worker %s: closing the lane: %s", self.spec.wid, exc)
            lane.close()
            return None

    def control(self, frames: list[Any]) -> None:
        try:
            msg = p.unpack_map(frames[1].buffer) if len(frames) > 1 else {}
        except p.ProtocolError:
            return
        if msg.get("t") == "stop":
            self.stopping = True

    def finish(self, launched: Launched) -> None:
        """Answer every request of a completed launch (``workers.replies``)."""
        self.replies.finish(launched)
