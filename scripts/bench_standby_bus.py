"""The standby section's last figures: in a child process that brought its device up as
a standby does, the safetensors load against a pinned host->device copy of the same
bytes (and the mapped path, and the read side alone). The child is started as
``python scripts/bench_standby.py load_vs_bus CONFIG_JSON``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The child's entry point (its __main__ dispatches to role_load_vs_bus).
BENCH_STANDBY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_standby.py")


def load_vs_bus(b: Any, dev: str, st: str, mib: float) -> None:
    from benchkit import Compare, readline

    p = b.procs.start([sys.executable, BENCH_STANDBY, "load_vs_bus",
                       json.dumps({"path": st, "device": dev, "repeats": 5})], name="bus")
    try:
        res = json.loads(readline(p, 600, "load vs bus"))
    finally:
        b.procs.kill(p)
    b.rows.append({"section": "standby", "name": "load vs bus", **res})
    print(f"  safetensors load {res['load_s']:.4f}s ({res['load_gbs']:.1f} GB/s, "
          f"{res['share']:.0%} of it by the mapped path (GPU_POOL_WEIGHTS_PATH), the rest "
          "by the ring; "
          f"{res['fallbacks']} loads fell back to the ring alone; its pinned memory "
          f"unpinned after it, {res['free_s']:.4f}s, as a worker does after ready), staged "
          f"to device {res['staged_s']:.4f}s, pinned copy {res['bus_s']:.4f}s "
          f"({res['bus_gbs']:.1f} GB/s); read side alone, {res['threads']} threads x "
          f"{res['chunk_mib']} MiB: {res['read_s']:.4f}s ({res['read_gbs']:.1f} GB/s); "
          + (f"mapped path failed: {res['mapped_error']}" if res.get("mapped_error") else
             f"mapped path: {res['mapped_s']:.4f}s ({res['mapped_gbs']:.1f} GB/s)")
          + f"; the ring alone: {res['ring_gbs']:.1f} GB/s",
          flush=True)
    if not res.get("mapped_error"):
        b.compare(Compare("standby", f"safetensors load {mib:.0f} MiB, mapped path / pinned copy",
                          "mapped", res["mapped_gbs"], "pinned copy", res["bus_gbs"], "GB/s",
                          target=None, note="GPU_POOL_WEIGHTS_PATH=mapped"))
    b.compare(Compare("standby", f"safetensors load {mib:.0f} MiB, the ring alone / pinned copy",
                      "ring", res["ring_gbs"], "pinned copy", res["bus_gbs"], "GB/s",
                      target=None, note="GPU_POOL_WEIGHTS_PATH=ring"))
    b.compare(Compare("standby", f"safetensors load {mib:.0f} MiB / pinned H2D copy",
                      "load", res["load_gbs"], "pinned copy", res["bus_gbs"], "GB/s",
                      target=None if dev == "cpu" else 0.6,
                      note=f"medians; the default path ({_path_name(res['share'])}), as a "
                           "standby loads"))


def _path_name(share: float) -> str:
    return "mapped" if share >= 1 else "ring" if share <= 0 else f"split {share:.0%} mapped"


def role_load_vs_bus(cfg: dict[str, Any]) -> int:
    """In a process that brought its device up as a standby does: the median time of
    ``workers.weights.load_file``, of a staged file's ``to_device``, and of one pinned
    host->device copy of as many bytes."""
    import torch

    from workers import weights, weights_split
    from workers.standby import prepare

    dev_name = cfg["device"]
    prepare(dev_name)  # CUDA context, cuBLAS, the pinned ring
    dev = torch.device("cuda", torch.cuda.current_device()) if dev_name != "cpu" else \
        torch.device("cpu")
    cuda = dev.type == "cuda"
    path = cfg["path"]
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    from bench_weights_paths import read_ceiling

    loads, frees, staged, bus, reads, mapped, ring_only = [], [], [], [], [], [], []
    mapped_error: str | None = None  # the opt-in mapped path failing is reported, not fatal
    nbytes = weights.read_header(path).data_size
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    for i in range(cfg["repeats"] + 1):
        if cuda:
            weights.reserve_ring()  # as a standby holds it before its one load
        sync()
        # As in a worker (workers.serve): the ring's unpinning waits until after ready,
        # so it is timed on its own, after the load.
        weights.defer_host_frees(cuda)
        t = time.monotonic()
        out = weights.load_file(path, dev)
        sync()
        if i:
            loads.append(time.monotonic() - t)
        weights.defer_host_frees(False)
        t = time.monotonic()
        weights.flush_host_frees()
        if i:
            frees.append(time.monotonic() - t)
        del out
        if mapped_error is None:
            mapped_error = _time_mapped(path, dev, sync, mapped if i else [])
        if cuda:
            weights.reserve_ring()
        _time_load(path, dev, sync, ring_only if i else [], share=0.0)
        if cuda:
            torch.cuda.empty_cache()
        t_read = read_ceiling(path, weights.READ_THREADS, weights.CHUNK_BYTES, cuda)
        if i:
            reads.append(t_read)
        s = weights.stage_file(path, pin=cuda)
        t = time.monotonic()
        out = s.to_device(dev)
        sync()
        if i:
            staged.append(time.monotonic() - t)
        s.release()
        del out, s
        t = time.monotonic()
        target.copy_(host, non_blocking=cuda)
        sync()
        if i:
            bus.append(time.monotonic() - t)
        if cuda:
            torch.cuda.empty_cache()
    med = {k: statistics.median(v) for k, v in (("load_s", loads), ("staged_s", staged),
                                                 ("bus_s", bus), ("free_s", frees),
                                                 ("read_s", reads),
                                                 ("ring_s", ring_only),
                                                 ("mapped_s", mapped or [float("nan")]))}
    print(json.dumps({**med, "bytes": nbytes, "load_gbs": nbytes / med["load_s"] / 1e9,
                      "bus_gbs": nbytes / med["bus_s"] / 1e9,
                      "read_gbs": nbytes / med["read_s"] / 1e9,
                      "mapped_gbs": nbytes / med["mapped_s"] / 1e9,
                      "mapped_error": mapped_error,
                      "ring_gbs": nbytes / med["ring_s"] / 1e9,
                      "share": weights_split.mapped_share(dev, None, os.path.getsize(path)),
                      "fallbacks": weights_split.fallbacks,
                      "threads": weights.READ_THREADS, "chunk_mib": weights.CHUNK_BYTES >> 20,
                      "staged_gbs": nbytes / med["staged_s"] / 1e9,
                      "loads": loads, "bus": bus}), flush=True)
    return 0


def _time_mapped(path: str, dev: torch.device, sync: Callable[[], None],
                 into: list[float]) -> str | None:
    """One load by the mapped path alone (GPU_POOL_WEIGHTS_PATH=mapped), its seconds
    appended to ``into``; a failure is returned as text (the ring's figures stand
    without it)."""
    return _time_load(path, dev, sync, into, share=1.0)


def _time_load(path: str, dev: torch.device, sync: Callable[[], None],
               into: list[float], share: float) -> str | None:
    """One load with ``share`` of the file by the mapped path, its frees after it as a
    worker's; the seconds of the load appended to ``into``, a failure returned as text."""
    import torch

    from workers import weights

    if dev.type == "cuda":
        torch.cuda.empty_cache()  # no cached device blocks: a standby's allocator has none
    weights.defer_host_frees(dev.type == "cuda")
    t = time.monotonic()
    try:
        out = weights.load_file(path, dev, share=share)
        sync()
        seconds = time.monotonic() - t  # its frees wait until after ready, as a worker's
    except Exception as exc:  # noqa: BLE001 - any failure of the opt-in path is a finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        weights.defer_host_frees(False)
        weights.flush_host_frees()
    into.append(seconds)
    del out
    return None
