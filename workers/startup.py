"""A worker's start-up, from the device to a warmed, probed and validated model.

Each step is a function with typed inputs and results; ``start`` runs them in order on
a ``workers.serve.Worker``, reports each step's failure with its exit code, and says
"ready"; the worker then serves.
The order matters: the device comes up first (CUDA opens its files), then the process
confines itself (``workers.sandbox``), and only then is the model read, because a model
is code from its first byte on.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import zmq

from pool.contract import Contract, InputSignature
from router import protocol as p
from router.frames import recv_frames
from workers import weights
from workers.graphs import capture_graphs
from workers.lane import Lane
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
)
from workers.manifest import Manifest, ManifestError, load_manifest
from workers.preload import Preloaded
from workers.probe import ProbeError, contract_of
from workers.sandbox import SandboxError, SandboxReport, confine
from workers.schema import forward_schema, warmup_sets
from workers.staged import stage_model
from workers.staging import ALIGN
from workers.warmup import ValidationError, WarmupError, served_sets, validate, warm_up

if TYPE_CHECKING:
    from workers.serve import Worker

log = logging.getLogger(__name__)

# "0": free pinned load buffers (the weights ring, drain-first's staged copy) before
# "ready", as before; default: after it, on a thread of their own (flush_after_ready).
DEFER_HOST_FREE_ENV = "GPU_POOL_DEFER_HOST_FREE"


def start(worker: Worker) -> int | None:
    """Bring ``worker`` up to "ready" (said); None then, else the exit code: a step
    failed (reported to poold), or poold said "stop" before "go"."""
    spec = worker.spec
    worker.event("hello", model=spec.model, version=spec.version, device=spec.device)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    if spec.spawned_at:  # CLOCK_MONOTONIC is the machine's: poold's clock too
        timings["to_main_s"] = t0 - spec.spawned_at
    worker.device = bring_up_device(spec, timings, t0)
    # Confined before the model is read: a model is code, from its first byte on
    # (a pickle runs as it loads). CUDA is up, so the device files are open already.
    t_conf = time.monotonic()
    pre, worker.preloaded = worker.preloaded, None
    try:
        worker.sandbox = confine_worker(spec, pre)
    except SandboxError as exc:
        return worker.fail("sandbox", exc, EXIT_SANDBOX_FAILED)
    timings["confine_s"] = time.monotonic() - t_conf
    if worker.device.type == "cuda" and os.environ.get(DEFER_HOST_FREE_ENV, "1") != "0":
        weights.defer_host_frees()  # given back after "ready" (flush_after_ready)
    worker.event("phase", phase="loading")
    t1 = time.monotonic()
    try:
        roots = spec.model_roots or None  # none sent (a test's worker): its own dir
        manifest = worker.manifest = load_manifest(spec.path, roots)
        loaded = load_onto_device(
            spec, worker.device, manifest, pre, t1, timings, worker.loaded_bytes,
            worker.event, lambda: wait_for_go(worker.sock),
        )  # fmt: skip
        if loaded is None:
            return EXIT_OK  # told to stop before "go"
        model, t1 = loaded
        worker.model = model
        worker.sync()
        weights.release_ring()  # pinned by a standby for a load that may not use it
    except (ModelLoadError, ManifestError, OSError) as exc:
        return worker.fail("load", exc, EXIT_LOAD_FAILED)
    except Exception as exc:  # a broken model file can raise anything from torch
        return worker.fail("load", exc, EXIT_LOAD_FAILED)
    timings["load_s"] = time.monotonic() - t1
    worker.event("phase", phase="warming")
    try:
        warmed = warm(model, manifest, worker.warmup_signatures(), worker.device)
    except WarmupError as exc:
        return worker.fail("warmup", exc, EXIT_WARMUP_FAILED)
    timings["warm_s"] = warmed.warm_s
    sets = warmed.sets
    t_probe = time.monotonic()
    try:
        worker.learn_contract(sets, warmed.seen, warmed.source)
    except ProbeError as exc:
        return worker.fail("warmup", exc, EXIT_WARMUP_FAILED)
    timings["probe_s"] = time.monotonic() - t_probe
    if manifest is not None and manifest.golden:
        worker.event("phase", phase="validating")
        t3 = time.monotonic()
        try:
            validate(model, manifest)
        except ValidationError as exc:
            return worker.fail("validate", exc, EXIT_VALIDATION_FAILED)
        timings["validate_s"] = time.monotonic() - t3
    if spec.cuda_graphs and worker.device.type == "cuda":
        t4 = time.monotonic()
        worker.graph_info = capture(worker.launcher, sets, spec.max_batch, spec.wid)
        timings["graphs_s"] = time.monotonic() - t4
    t_arena = time.monotonic()
    worker.prepare_staging(sets)
    timings["arenas_s"] = time.monotonic() - t_arena
    if spec.lane:
        # Before "ready", so the router mostly has the lane before it routes to us
        # (until it does, everything comes on the backend socket).
        worker.lane = Lane.connect(spec.lane, spec.wid)
    announce_ready(worker, timings, t0)
    return None


def announce_ready(worker: Worker, timings: dict[str, float], t0: float) -> None:
    """Tell poold this worker serves: its timings, memory, graphs and contract."""
    assert worker.model is not None
    gpu = torch.cuda.memory_reserved(worker.device) if worker.device.type == "cuda" else 0
    timings["main_to_ready_s"] = time.monotonic() - t0
    worker.event(
        "ready",
        timings=timings,
        # Objects kept out of garbage collection: the torch import, frozen by the
        # spawner before it forked this process (workers.heap).
        heap_frozen=gc.get_freeze_count(),
        rss=rss_bytes(),
        torch_reserved=gpu,
        num_inputs=worker.model.num_inputs,
        graphs=worker.graph_info,
        standby=worker.spec.from_standby,
        sandbox=worker.sandbox.to_wire() if worker.sandbox is not None else None,
        contract=worker.contract.to_json() if worker.contract is not None else None,
        schema=schema.to_wire() if (schema := forward_schema(worker.model)) else None,
        # Last, so the fields above are made before it: poold times the event's way
        # to it (ready_delivery_s).
        sent_at=time.monotonic(),
    )


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


def bring_up_device(spec: WorkerSpec, timings: dict[str, float], t0: float) -> torch.device:
    """The worker's device, CUDA initialised on it (``cuda_init_s``), and torch's CPU
    thread count set."""
    device = torch.device("cpu")
    if spec.device.startswith("cuda"):
        device = torch.device("cuda", 0)
        torch.cuda.init()
        torch.empty(1, device=device)
        torch.cuda.synchronize()
        timings["cuda_init_s"] = time.monotonic() - t0
    # The spawner imported torch with one thread; pick the real count here. A GPU
    # worker needs few CPU threads: the forward runs on the device.
    cpu_threads = default_threads() if device.type == "cpu" else min(4, default_threads())
    torch.set_num_threads(spec.threads or cpu_threads)
    return device


def confine_worker(spec: WorkerSpec, pre: Preloaded | None) -> SandboxReport | None:
    """Confine this process before the model is read (raises ``SandboxError``); a
    standby that confined itself before its preload hands its report on."""
    if pre is not None and pre.sandbox is not None:
        return pre.sandbox
    return confine(spec.sandbox, spec.model_roots, spec.path, spec.device)


def wait_for_go(sock: zmq.Socket[Any]) -> bool:
    """Block until poold says "go" (True: the device is ours) or "stop" (False).

    Nothing else can arrive: a worker that has not said "ready" is in no route."""
    while True:
        frames = recv_frames(sock, 0)  # blocking
        if frames and frames[0].bytes == p.KIND_CONTROL and len(frames) > 1:
            try:
                kind = p.unpack_map(frames[1].buffer).get("t")
            except p.ProtocolError:
                continue
            if kind in ("go", "stop"):
                return kind == "go"


class OnDevice(NamedTuple):
    model: LoadedModel
    since: float  # when the load's timed part began (drain-first: at "go")


def load_onto_device(
    spec: WorkerSpec,
    device: torch.device,
    manifest: Manifest | None,
    pre: Preloaded | None,
    t1: float,
    timings: dict[str, float],
    on_bytes: Callable[[int, int], None],
    event: Callable[..., None],
    go: Callable[[], bool],
) -> OnDevice | None:
    """The model on ``device``: from what a standby read ahead, from a staged host copy
    (drain-first: staged, then "go" awaited), or loaded straight from the file. None:
    told to stop while it waited for "go". Raises whatever the load raised. ``t1``:
    when the load phase began (the manifest was read since)."""
    staged = pre.take(spec) if pre is not None else None
    if staged is not None:
        timings["preloaded"] = 1.0  # read by the standby ahead of need
    if spec.hold_device:
        if staged is None:
            meter = LoadMeter.for_file(spec.path, on_bytes)
            meter.start()
            pin = device.type == "cuda"
            staged = stage_model(spec.path, manifest, pin, meter.add)
            meter.finish()
        timings["staged_s"] = time.monotonic() - t1
        event("phase", phase="staged", staged_s=timings["staged_s"])
        if not go():
            return None
        t1 = time.monotonic()
        model = staged.to_device(device)
        timings["to_device_s"] = time.monotonic() - t1
    elif staged is not None:
        model = staged.to_device(device)
        timings["to_device_s"] = time.monotonic() - t1
    else:
        meter = LoadMeter.for_file(spec.path, on_bytes)
        meter.start()
        model = load_model(spec.path, device, manifest, meter.add)
        meter.finish()
    return OnDevice(model, t1)


@dataclass
class Warmed:
    """The inputs a model was warmed up on (the graphs and the arenas are sized from
    ``sets``), the outputs seen, and where the inputs came from."""

    sets: list[list[torch.Tensor]]
    seen: list[list[torch.Tensor]]
    source: str
    warm_s: float


def warm(
    model: LoadedModel,
    manifest: Manifest | None,
    signatures: list[InputSignature],
    device: torch.device,
) -> Warmed:
    """Warm the model up on its known inputs (raises ``WarmupError``); the served
    signatures are added to ``sets`` afterwards, for the graphs and the arenas."""
    sets, source = warmup_sets(model, manifest, signatures, device)
    seen: list[list[torch.Tensor]] = []
    warm_s = warm_up(model, sets, seen)
    sets += served_sets(model, manifest, signatures, device, seen)
    return Warmed(sets, seen, source, warm_s)


def learn_contract(
    launcher: Launcher,
    model: LoadedModel,
    manifest: Manifest | None,
    sets: list[list[torch.Tensor]],
    seen: list[list[torch.Tensor]],
    source: str,
) -> Contract | None:
    """This version's contract from its warm-up (``workers.probe``); a model whose
    outputs do not follow the batch is served one request per forward from now on."""
    contract = contract_of(model, manifest, sets, seen, source)
    if contract is not None:
        launcher.batchable = contract.batchable
    return contract


def capture(
    launcher: Launcher, sets: list[list[torch.Tensor]], max_batch: int, wid: str
) -> dict[str, Any]:
    """CUDA graphs of the forward for the warm-up signatures (``workers.graphs``), put
    in ``launcher``; a signature that cannot be captured keeps the ordinary forward.
    Returns what the ready event reports of them."""
    assert launcher.model is not None
    batchable = launcher.batchable  # the contract's, learned just before
    if not batchable:
        log.info(
            "worker %s: the model cannot be batched: CUDA graphs only at the shapes "
            "it was warmed up on, each replayed for requests of exactly that shape",
            wid,
        )
    # Signatures left out are reported in the ready event (poold logs them).
    table, problems = capture_graphs(launcher.model, sets, max(1, max_batch), batchable)
    if len(table):
        launcher.use_graphs(table)
    return {**table.describe(), "batchable": batchable, "skipped": problems}


def arena_row_bytes(sets: list[list[torch.Tensor]]) -> int:
    """The staging bytes one row of the largest warm-up input set takes (aligned)."""
    per_row = 0
    for inputs in sets:
        row = 0
        for t in inputs:
            rows = int(t.shape[0]) if t.dim() and t.shape[0] else 1
            row += t.numel() * t.element_size() // rows + ALIGN
        per_row = max(per_row, row)
    return per_row


def flush_after_ready() -> None:
    """Give back the pinned memory the load deferred, off the serving thread: unpinning
    (cudaFreeHost) of a staged model takes tens of milliseconds or more."""
    if not weights.defer_host_frees(False):
        return  # nothing was deferred
    threading.Thread(target=weights.flush_host_frees, name="host-free", daemon=True).start()
