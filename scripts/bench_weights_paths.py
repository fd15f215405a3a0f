"""Weights onto one device, three ways, from the page cache: GB/s of each.

    PYTHONPATH=. python scripts/bench_weights_paths.py [--device cuda:0] [--mib 768]

On one file of ``--mib`` MiB of float32 weights (Linear(4096, 4096) layers, as TorchScript
and as safetensors with the same bytes), times ``torch.jit.load``,
``safetensors.torch.load_file(device=...)`` and ``workers.weights.load_file`` (the CUDA
path of the safetensors model format) with a few chunk/thread/ring variants. Then the
read side alone (``read_ceiling``: page cache into a ring of host buffers, pinned on
CUDA, by 1 to 16 threads, no device copy), which bounds what any reader pipeline can
reach on the host. Each is the median of ``--repeats`` timed loads after one untimed
one; the clock stops after ``torch.cuda.synchronize()``, and device memory is handed
back between loads so each pays its own allocations. Also prints what pinning one ring
costs on its own, and checks that workers.weights gives the same bytes as safetensors.
Needs torch, numpy, safetensors and this repository on PYTHONPATH; about 30 s on an H100
host, most of it writing files.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import safetensors.torch
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from workers import weights  # noqa: E402

HIDDEN = 4096
LAYER_MIB = HIDDEN * HIDDEN * 4 >> 20  # 64 MiB of float32 per layer (plus a 16 KiB bias)
# (chunk MiB, reader threads, ring slots); the first is workers.weights' default.
CPUS = len(os.sched_getaffinity(0))
VARIANTS = [
    (weights.CHUNK_BYTES >> 20, weights.READ_THREADS, weights.RING_SLOTS),
    (4, 4, 6),
    (16, 4, 6),
    (8, 8, 10),
    (32, 2, 4),
    # More readers than the default (half the cores): is the read side the limit?
    *((c, t, t + 2) for c in (8, 16) for t in (12, 16) if t <= CPUS),
]
# Reader threads for the read-only ceiling (read_ceiling), capped at the CPUs.
CEILING_THREADS = sorted({t for t in (1, 2, 4, 8, 12, 16) if t <= CPUS} | {min(CPUS, 16)})


def read_ceiling(path: str, threads: int, chunk: int, pin: bool) -> float:
    """Seconds to read the data region of ``path`` from the page cache into a ring of
    ``threads + 2`` host buffers (pinned with ``pin``) by ``threads`` readers, chunk by
    chunk as workers.weights does, with no device copy: the read side's ceiling."""
    from concurrent.futures import ThreadPoolExecutor

    header = weights.read_header(path)
    slots = threads + 2
    ring = [torch.empty(chunk, dtype=torch.uint8, pin_memory=pin) for _ in range(slots)]
    views = [b.numpy().data for b in ring]
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = []
            for k, lo in enumerate(range(0, header.data_size, chunk)):
                if len(futures) >= slots:
                    futures[len(futures) - slots].result()  # that slot is free again
                view = views[k % slots][: min(chunk, header.data_size - lo)]
                futures.append(
                    pool.submit(weights._read_into, fd, view, header.data_start + lo, None)
                )
            for f in futures:
                f.result()
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        views.clear()
        ring.clear()


def make_files(directory: str, mib: int) -> tuple[str, str]:
    """The same weights as TorchScript (``w.pt``) and safetensors (``w.safetensors``);
    kept and reused when ``directory`` already has both."""
    pt, st = os.path.join(directory, "w.pt"), os.path.join(directory, "w.safetensors")
    layers = max(1, mib // LAYER_MIB)
    if os.path.exists(pt) and os.path.exists(st):
        return pt, st
    model = torch.nn.Sequential(
        *(torch.nn.utils.skip_init(torch.nn.Linear, HIDDEN, HIDDEN) for _ in range(layers))
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.01, 0.01, generator=g)
    torch.jit.script(model).save(pt + ".tmp")
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, st + ".tmp"
    )
    os.replace(pt + ".tmp", pt)
    os.replace(st + ".tmp", st)
    return pt, st


def read_through(path: str) -> None:
    """Read the whole file once, so that every timed load comes from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def median_time(fn: Callable[[], object], dev: torch.device, repeats: int) -> list[float]:
    """One untimed call, then ``repeats`` timed ones; what ``fn`` returns is dropped each
    time and device memory handed back."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        dt = time.perf_counter() - t0
        del out
        release(dev)
        if i:
            times.append(dt)
    return times


def report(name: str, times: list[float], nbytes: int, base: float | None) -> float:
    t = statistics.median(times)
    rate = nbytes / t / 1e9
    vs = f"  {rate / base:5.2f}x jit.load" if base else ""
    runs = ", ".join(f"{x * 1e3:.0f}" for x in times)
    print(f"  {name:<44} {t * 1e3:8.1f} ms {rate:7.2f} GB/s{vs}   (runs ms: {runs})", flush=True)
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda:0" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=default, help=f"target device (default {default})")
    ap.add_argument("--mib", type=int, default=768, help="size of the weights file")
    ap.add_argument("--repeats", type=int, default=3, help="timed loads per path (median)")
    ap.add_argument("--dir", help="keep the files here and reuse them (default: a temp dir)")
    ap.add_argument(
        "--variants",
        help="chunk_MiB:threads:slots,... for workers.weights (default: "
        + ",".join(f"{c}:{t}:{s}" for c, t, s in VARIANTS)
        + ")",
    )
    args = ap.parse_args()
    dev = torch.device(args.device)
    variants = VARIANTS
    if args.variants:
        variants = []
        for v in args.variants.split(","):
            chunk_mib, threads, slots = (int(x) for x in v.split(":"))
            variants.append((chunk_mib, threads, slots))
    if dev.type == "cuda":
        torch.empty(1, device=dev)  # context creation is no part of any load
        print(f"device: {dev} = {torch.cuda.get_device_name(dev)}", flush=True)
    else:
        print(f"device: {dev} (the CUDA path's ring runs here with plain host memory)")

    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        directory = args.dir or tmp
        os.makedirs(directory, exist_ok=True)
        t0 = time.perf_counter()
        pt, st = make_files(directory, args.mib)
        header = weights.read_header(st)
        nbytes = header.data_size
        print(
            f"files: {nbytes / 2**20:.0f} MiB of weights in {len(header.tensors)} tensors, "
            f"ready in {time.perf_counter() - t0:.1f}s ({directory})",
            flush=True,
        )
        read_through(pt)
        read_through(st)

        base = report(
            "torch.jit.load",
            median_time(lambda: torch.jit.load(pt, map_location=dev), dev, args.repeats),
            nbytes,
            None,
        )
        if dev.type == "cuda":
            # TorchScript another way: read onto the CPU, then one copy per tensor (what a
            # standby's preload and drain-first staging do, there with pinning off the path).
            from workers.staged import _pinned

            def cpu_then_device(pin: bool) -> object:
                m = torch.jit.load(pt, map_location="cpu")
                return _pinned(m, pin).to(dev, non_blocking=pin)

            report(
                "torch.jit.load to cpu, then .to(device)",
                median_time(lambda: cpu_then_device(False), dev, args.repeats),
                nbytes,
                base,
            )
            report(
                "torch.jit.load to cpu, pin, then .to(device)",
                median_time(lambda: cpu_then_device(True), dev, args.repeats),
                nbytes,
                base,
            )
        report(
            "safetensors.torch.load_file",
            median_time(
                lambda: safetensors.torch.load_file(st, device=str(dev)), dev, args.repeats
            ),
            nbytes,
            base,
        )
        for chunk_mib, threads, slots in variants:

            def load(c: int = chunk_mib, t: int = threads, s: int = slots) -> object:
                return weights.load_file(st, dev, chunk_bytes=c << 20, threads=t, ring_slots=s)

            tag = " (default)" if (chunk_mib, threads, slots) == VARIANTS[0] else ""
            report(
                f"workers.weights {chunk_mib} MiB x {slots} slots, {threads} thr{tag}",
                median_time(load, dev, args.repeats),
                nbytes,
                base,
            )

        for chunk_mib in (8, 32, 128):

            def load_mapped(c: int = chunk_mib) -> object:
                # As a worker does it: the registrations undone after ready, untimed here.
                weights.defer_host_frees(True)
                try:
                    return weights.load_file(st, dev, chunk_bytes=c << 20, mapped=True)
                finally:
                    weights.defer_host_frees(False)
                    weights.flush_host_frees()

            report(
                f"workers.weights mapped, {chunk_mib} MiB chunks registered",
                median_time(load_mapped, dev, args.repeats),
                nbytes,
                base,
            )

        pin = dev.type == "cuda"
        for threads in CEILING_THREADS:
            times = [
                read_ceiling(st, threads, weights.CHUNK_BYTES, pin) for _ in range(args.repeats + 1)
            ][1:]
            report(
                f"read only, {threads} thr into a {'pinned' if pin else 'host'} ring",
                times,
                nbytes,
                base,
            )

        if dev.type == "cuda":
            ring_mib = weights.CHUNK_BYTES * weights.RING_SLOTS >> 20

            def pin() -> None:
                # All held at once (a freed block would be reused from torch's cache), then
                # given back to the system, as workers.weights does after each load.
                ring = [
                    torch.empty(weights.CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
                    for _ in range(weights.RING_SLOTS)
                ]
                del ring
                weights._empty_host_cache()

            times = median_time(pin, dev, args.repeats)
            print(
                f"  pinning + unpinning the default ring ({ring_mib} MiB) alone: "
                f"{statistics.median(times) * 1e3:.1f} ms",
                flush=True,
            )

        want = safetensors.torch.load_file(st, device=str(dev))
        got = weights.load_file(st, dev)
        same = got.keys() == want.keys() and all(
            torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
            for k in want
        )
        print(f"workers.weights == safetensors, bit for bit: {same}", flush=True)
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
