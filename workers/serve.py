"""Inside the worker: load, warm, validate, then serve batches until told to stop."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import zmq

from router import protocol as p
from router.frames import recv_frames, send_frames
from workers.batching import batch_key, plan_batches
from workers.codec import WIRE_DTYPES, decode_inputs, encode_outputs
from workers.loader import LoadedModel, ModelLoadError, load_model
from workers.main import (
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_VALIDATION_FAILED,
    EXIT_WARMUP_FAILED,
    WorkerSpec,
    rss_bytes,
    send_event,
)
from workers.manifest import ManifestError, load_manifest
from workers.staging import Stager
from workers.warmup import ValidationError, WarmupError, example_inputs, validate, warm_up

log = logging.getLogger(__name__)

MAX_SHAPES_KEPT = 8  # input signatures remembered for the next version's warm-up


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, len(os.sched_getaffinity(0)))


class Pending:
    """A decoded request waiting for its batch."""

    __slots__ = ("key", "header", "inputs", "size")

    def __init__(self, key: bytes, header: dict[str, Any], inputs: list[torch.Tensor]) -> None:
        self.key = key
        self.header = header
        self.inputs = inputs
        self.size = int(inputs[0].shape[0]) if inputs and inputs[0].dim() > 0 else 1


class Worker:
    def __init__(self, spec: WorkerSpec, sock: zmq.Socket[Any]) -> None:
        self.spec = spec
        self.sock = sock
        self.device = torch.device("cpu")
        self.stager = Stager(self.device)
        self.model: LoadedModel | None = None
        self.served = 0
        self.stopping = False
        self.last_beat = 0.0
        self.shapes: dict[tuple[Any, ...], int] = {}
        self.batch_sizes: dict[int, int] = {}

    # ------------------------------------------------------------------ start-up
    def event(self, kind: str, **fields: Any) -> None:
        send_event(self.sock, {"t": kind, "pid": os.getpid(), "wid": self.spec.wid, **fields})

    def main(self) -> int:
        spec = self.spec
        self.event("hello", model=spec.model, version=spec.version, device=spec.device)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        if spec.device.startswith("cuda"):
            self.device = torch.device("cuda", 0)
            self.stager = Stager(self.device)
            torch.cuda.init()
            torch.empty(1, device=self.device)
            torch.cuda.synchronize()
            timings["cuda_init_s"] = time.monotonic() - t0
        # The spawner imported torch with one thread; pick the real count here. A GPU
        # worker needs few CPU threads: the forward runs on the device.
        cpu_threads = default_threads() if self.device.type == "cpu" else min(4, default_threads())
        torch.set_num_threads(spec.threads or cpu_threads)
        self.event("phase", phase="loading")
        t1 = time.monotonic()
        try:
            manifest = load_manifest(spec.path)
            self.model = load_model(spec.path, self.device, manifest)
            self.sync()
        except (ModelLoadError, ManifestError, OSError) as exc:
            return self.fail("load", exc, EXIT_LOAD_FAILED)
        except Exception as exc:  # a broken model file can raise anything from torch
            return self.fail("load", exc, EXIT_LOAD_FAILED)
        timings["load_s"] = time.monotonic() - t1
        self.event("phase", phase="warming")
        try:
            sets = example_inputs(manifest, spec.observed_shapes or None, self.device)
            timings["warm_s"] = warm_up(self.model, sets)
        except WarmupError as exc:
            return self.fail("warmup", exc, EXIT_WARMUP_FAILED)
        if manifest is not None and manifest.golden:
            self.event("phase", phase="validating")
            t3 = time.monotonic()
            try:
                validate(self.model, manifest)
            except ValidationError as exc:
                return self.fail("validate", exc, EXIT_VALIDATION_FAILED)
            timings["validate_s"] = time.monotonic() - t3
        gpu = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        self.event(
            "ready",
            timings=timings,
            rss=rss_bytes(),
            torch_reserved=gpu,
            num_inputs=self.model.num_inputs,
        )
        self.serve()
        self.event("bye", served=self.served)
        return EXIT_OK

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
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        interval_ms = max(1, int(self.spec.heartbeat_interval_s * 1000))
        max_batch = max(1, self.spec.max_batch)
        delay = self.spec.max_delay_ms / 1000.0
        self.beat()
        while not self.stopping:
            if poller.poll(interval_ms):
                batch: list[Pending] = []
                self.take(batch, max_batch)
                if delay > 0 and batch and self.rows(batch) < max_batch:
                    # Wait a little for company: one forward of many rows costs about
                    # as much as one of a single row on a GPU.
                    until = time.monotonic() + delay
                    while self.rows(batch) < max_batch:
                        left = until - time.monotonic()
                        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                            break
                        self.take(batch, max_batch)
                if batch:
                    self.execute(batch)
            if time.monotonic() - self.last_beat >= self.spec.heartbeat_interval_s:
                self.beat()

    @staticmethod
    def rows(batch: list[Pending]) -> int:
        return sum(r.size for r in batch)

    def beat(self) -> None:
        self.last_beat = time.monotonic()
        shapes = sorted(self.shapes, key=self.shapes.__getitem__, reverse=True)[:MAX_SHAPES_KEPT]
        batches, self.batch_sizes = self.batch_sizes, {}
        self.event(
            "hb",
            served=self.served,
            rss=rss_bytes(),
            shapes=[list(s) for s in shapes],
            # [rows per forward, count] since the last beat, for the batch-size metric
            # (pairs, not a map: the router decodes maps with string keys only).
            batches=[[size, n] for size, n in batches.items()],
        )

    def take(self, batch: list[Pending], max_batch: int) -> None:
        """Receive what is waiting, without blocking, until the batch is full."""
        while self.rows(batch) < max_batch:
            try:
                frames = recv_frames(self.sock)
            except zmq.Again:
                return
            kind = frames[0].bytes
            if kind == p.KIND_CONTROL:
                self.control(frames)
            elif kind == p.KIND_REQUEST and len(frames) >= 3:
                pending = self.decode(frames)
                if pending is not None:
                    batch.append(pending)

    def control(self, frames: list[Any]) -> None:
        try:
            msg = p.unpack_map(frames[1].buffer) if len(frames) > 1 else {}
        except p.ProtocolError:
            return
        if msg.get("t") == "stop":
            self.stopping = True

    def decode(self, frames: list[Any]) -> Pending | None:
        key = frames[1].bytes
        header: dict[str, Any] = {}
        try:
            header = p.unpack_map(frames[2].buffer)
            inputs = decode_inputs(header, [f.buffer for f in frames[3:]])
            expected = self.model.num_inputs if self.model else None
            if expected is not None and len(inputs) != expected:
                raise p.ProtocolError(
                    p.BAD_REQUEST,
                    f"model {self.spec.model!r} takes {expected} inputs, got {len(inputs)}",
                )
        except p.ProtocolError as exc:
            self.reply_error(key, header, exc.code, exc.message)
            return None
        except Exception as exc:  # whatever the codec missed must not kill the worker
            self.reply_error(key, header, p.BAD_REQUEST, f"{type(exc).__name__}: {exc}"[:2000])
            return None
        return Pending(key, header, inputs)

    def execute(self, batch: list[Pending]) -> None:
        keys = [batch_key(r.inputs) for r in batch]
        groups = plan_batches(keys, [r.size for r in batch], self.spec.max_batch)
        for group in groups:
            members = [batch[i] for i in group]
            rows = self.rows(members)
            self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
            results = self.forward_group(members)
            for req, result in zip(members, results, strict=True):
                if isinstance(result, BaseException):
                    msg = f"{type(result).__name__}: {result}"
                    self.reply_error(req.key, req.header, p.MODEL_ERROR, msg[:4000])
                else:
                    self.reply(req, result)
            self.remember_shapes(members[0])

    def forward_group(self, members: list[Pending]) -> list[list[torch.Tensor] | BaseException]:
        assert self.model is not None
        if len(members) == 1:
            return [self.forward_one(members[0].inputs)]
        self.stager.reset()
        n_inputs = len(members[0].inputs)
        stacked = [self.stager.stage([m.inputs[i] for m in members]) for i in range(n_inputs)]
        sizes = [m.size for m in members]
        try:
            outputs = self.model.forward(stacked)
        except Exception:
            return [self.forward_one(m.inputs) for m in members]  # find whose input fails
        total = sum(sizes)
        if any(o.dim() == 0 or o.shape[0] != total for o in outputs):
            return [self.forward_one(m.inputs) for m in members]
        moved = [o.cpu() for o in outputs]
        parts = [torch.split(o, sizes) for o in moved]
        return [[part[j] for part in parts] for j in range(len(members))]

    def forward_one(self, inputs: list[torch.Tensor]) -> list[torch.Tensor] | BaseException:
        assert self.model is not None
        self.stager.reset()
        try:
            outputs = self.model.forward([self.stager.stage([t]) for t in inputs])
            return [o.cpu() for o in outputs]  # also: the staging arena is free again
        except Exception as exc:
            return exc

    def remember_shapes(self, req: Pending) -> None:
        sig = tuple((WIRE_DTYPES.get(t.dtype, "float32"), list(t.shape)) for t in req.inputs)
        key = tuple((d, tuple(s)) for d, s in sig)
        self.shapes[key] = self.shapes.get(key, 0) + 1

    def reply(self, req: Pending, outputs: list[torch.Tensor]) -> None:
        try:
            header, frames = encode_outputs(
                outputs, self.spec.model, self.spec.version, req.header.get("id")
            )
        except TypeError as exc:
            self.reply_error(req.key, req.header, p.MODEL_ERROR, str(exc))
            return
        self.served += 1
        send_frames(self.sock, [p.KIND_REQUEST, req.key, b"OK", header, *frames])

    def reply_error(self, key: bytes, header: dict[str, Any], code: str, message: str) -> None:
        self.served += 1
        body = p.error_header(
            code, message, model=self.spec.model, version=self.spec.version, rid=header.get("id")
        )
        send_frames(self.sock, [p.KIND_REQUEST, key, code.encode(), body])
