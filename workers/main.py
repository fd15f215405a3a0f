"""The worker process: one model on one device, from load to a clean exit.

Started by ``workers.spawner`` (a process that imported torch and never touched CUDA),
it pins its device before CUDA is initialised, loads and warms the model, announces
itself ready, then serves batches from the router until told to stop. The serving loop
itself sends the heartbeat, so a forward that never returns shows up as silence.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from router import lifeline
from router import protocol as p
from workers.exitcodes import (  # noqa: F401  re-exported for the worker code
    EXIT_INTERNAL,
    EXIT_LOAD_FAILED,
    EXIT_OK,
    EXIT_ORPHANED,
    EXIT_SANDBOX_FAILED,
    EXIT_VALIDATION_FAILED,
    EXIT_WARMUP_FAILED,
)
from workers.title import set_title, worker_title

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """Everything a worker needs, sent by the supervisor through the spawner."""

    wid: str
    backend: str
    model: str
    path: str
    version: str
    device: str
    generation: int
    max_batch: int = 8
    max_delay_ms: float = 0.0
    heartbeat_interval_s: float = 1.0
    threads: int | None = None
    lifeline_fd: int = -1
    # Warm-up inputs, each an InputSignature's wire map (pool.contract): what the
    # serving version was sent, then its contract's examples.
    warmup_signatures: list[Any] = field(default_factory=list)
    cuda_graphs: bool = False  # capture the forward per batch size (workers.graphs)
    lane: str = ""  # the router's lane socket (workers.lane); "" without one
    # Drain-first with a standby: read the weights into host memory, report "staged",
    # and touch the device only after poold says "go" (the old worker's memory is back).
    hold_device: bool = False
    # The pool's model roots: what a manifest's golden file must resolve into.
    model_roots: list[str] = field(default_factory=list)
    from_standby: bool = False  # set inside a standby that was taken; never on the wire
    spawned_at: float = 0.0  # poold's time.monotonic() when it asked for this worker
    # What poold asks of the sandbox (workers.sandbox.confine): mode, run_dir.
    sandbox: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def watch_lifeline(fd: int) -> None:
    """Exit at once when poold dies, even in the middle of a forward (router.lifeline)."""
    lifeline.watch_lifeline(fd, lambda: os._exit(EXIT_ORPHANED))


def pin_device(device: str) -> None:
    """Pin the device before CUDA initialises: this process then only ever creates a
    context on its own GPU, and it appears there as cuda:0."""
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = index


def run(spec: WorkerSpec, preloaded: Any = None) -> int:
    """Worker entry point; returns the process exit code. ``preloaded``: what a standby
    read ahead (``workers.preload.Preloaded``)."""
    if spec.lifeline_fd >= 0 and not spec.from_standby:  # a standby watches it already
        watch_lifeline(spec.lifeline_fd)
    set_title(*worker_title(spec.model, spec.version, spec.device, spec.wid))
    pin_device(spec.device)
    from workers.serve import Worker  # imports torch: already loaded by the spawner

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, spec.wid.encode())
    sock.setsockopt(zmq.LINGER, 2000)  # let the last replies and "bye" reach the router
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(spec.backend)
    try:
        return Worker(spec, sock, preloaded).main()
    except Exception as exc:  # a bug of ours or torch's: poold logs it, pool-ctl shows why
        report_internal_error(sock, spec, exc)
        return EXIT_INTERNAL
    finally:
        sock.close()
        ctx.term()


def report_internal_error(sock: zmq.Socket[Any], spec: WorkerSpec, exc: BaseException) -> None:
    """Send poold the one-line cause and the traceback of an unexpected error; poold
    logs the traceback and puts the cause in the upgrade result and the history."""
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:600]
    trace = "".join(traceback.format_exception(exc))[-8000:]
    try:
        send_event(
            sock,
            {
                "t": "failed",
                "pid": os.getpid(),
                "wid": spec.wid,
                "stage": "internal",
                "reason": cause,
                "traceback": trace,
            },
        )
    except Exception:  # the socket itself may be what broke: stderr still has it
        sys.stderr.write(f"worker {spec.wid}: internal error: {cause}\n{trace}")


def send_event(sock: zmq.Socket[Any], event: dict[str, Any]) -> None:
    sock.send_multipart([p.KIND_EVENT, msgpack.packb(event)])


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
