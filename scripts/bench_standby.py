#!/usr/bin/env python3
"""bench.py --standby: what a hot standby buys, each figure beside the same run's
figure without one (issue 19's table).

For the 768 MiB MLP, as TorchScript and as the safetensors factory format, one poold
with ``standby = false`` and one with ``standby = true``:

  spawn->ready   surge upgrades (no load): the new worker's spawn_to_ready_s
  drain-first    upgrades under 8 clients: the worst latency of any request that was
                 in flight during the upgrade, and how many failed
  kill -9        (TorchScript) SIGKILL of the only worker under 4 clients: from the
                 kill to the first answer at least 20 ms after it (so from the
                 replacement, not a reply the old worker sent just before it died)

and, in a child process that brought CUDA up as a standby does, the safetensors load
(``workers.weights.load_file``) against a pinned host->device copy of the same bytes.

The clients here are threads of this process using ``router.client.Client`` (what is
measured is hundreds of milliseconds; the GIL's microseconds do not matter).
Also ``python scripts/bench_standby.py load_vs_bus CONFIG_JSON`` (the child's role).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.abspath(__file__)
# The worker's own timings of what follows "go" in a drain-first upgrade (workers.serve).
WORKER_STEPS = ("to_device_s", "load_s", "warm_s", "probe_s", "arenas_s", "main_to_ready_s",
                "ready_delivery_s")
STALE_S = 0.02  # kill -9: answers sooner than this after the kill may be the old worker's


class Clients:
    """``n`` closed-loop client threads; every request's (sent, answered, ok) kept."""

    def __init__(self, frontend: str, model: str, n: int, hidden: int) -> None:
        import numpy as np

        self.frontend, self.model = frontend, model
        self.x = np.full((1, hidden), 0.01, np.float32)
        self.done: list[tuple[float, float, bool]] = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        from router.client import Client
        from router.errors import PoolError

        with Client(self.frontend, timeout=60.0, retries=1) as c:
            while not self.stop_flag.is_set():
                t0 = time.monotonic()
                try:
                    c.infer(self.model, self.x)
                    ok = True
                except PoolError:
                    ok = False
                with self.lock:
                    self.done.append((t0, time.monotonic(), ok))

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(90)

    def wait_answers(self, n: int, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        start = len(self.done)
        while len(self.done) < start + n:
            if time.monotonic() > end:
                raise TimeoutError(f"fewer than {n} answers in {timeout:.0f}s")
            time.sleep(0.01)

    def window(self, t0: float, t1: float) -> tuple[float, int, int]:
        """(worst latency, requests, failed) of the requests in flight during [t0, t1]."""
        with self.lock:
            rows = [r for r in self.done if r[1] >= t0 and r[0] <= t1]
        worst = max((b - a for a, b, _ in rows), default=0.0)
        return worst, len(rows), sum(not ok for _, _, ok in rows)

    def where(self, t0: float, t1: float) -> str:
        """Where the worst request of [t0, t1] sat, against the longest time in which no
        client got an answer: equal when every client waited on the same hold."""
        with self.lock:
            rows = sorted(r for r in self.done if r[1] >= t0 and r[0] <= t1)
        if not rows:
            return ""
        a, b, _ = max(rows, key=lambda r: r[1] - r[0])
        ends = sorted(r[1] for r in rows)
        gap, gap_at = max((y - x, x) for x, y in zip(ends, ends[1:], strict=False)) \
            if len(ends) > 1 else (0.0, t0)
        slow = sum(1 for r in rows if r[1] - r[0] > 0.1)
        return (f"worst sent +{a - t0:.3f}s answered +{b - t0:.3f}s; longest time with no "
                f"answer {gap:.3f}s from +{gap_at - t0:.3f}s; {slow} requests over 0.1 s")

    def first_answer_after(self, t: float, timeout: float = 60.0) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                after = [b for _, b, ok in self.done if ok and b > t]
            if after:
                return min(after) - t
            time.sleep(0.001)
        raise TimeoutError("no answer after the kill")


def wait_standby(pool: Any, device: str, timeout: float = 60.0) -> int:
    """The pid of the device's standby once it waits (and, with a preload of the serving
    version, once that has been read: pool.preload)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for sb in pool.ctl("status")["data"].get("standby", {}).get("standbys", []):
            pre = sb.get("preload") or {}
            if sb["device"] == device and sb["state"] == "waiting" and \
                    pre.get("state") != "loading":
                return int(sb["pid"])
        time.sleep(0.05)
    raise TimeoutError(f"no standby waiting on {device} after {timeout:.0f}s")


def wait_serving(pool: Any, old_pid: int | None = None, timeout: float = 120.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = pool.ctl("status")["data"]["models"][0]
        ready = [w["pid"] for w in m["workers"] if w["state"] == "ready"]
        if ready and ready[0] != old_pid:
            return int(ready[0])
        time.sleep(0.02)
    raise TimeoutError("no ready worker")


def section_standby(b: Any) -> None:
    from bench_harness import gpu_device, mlp_files, preread
    from benchkit import BenchError, Compare
    from benchmodels import MLP_WARM_BATCHES, make_factory_copy

    from workers.manifest import InputSpec, write_manifest

    dev = gpu_device(b, "standby")
    if dev is None:
        return
    print(f"\n== standby: hot standby against none, on {dev}", flush=True)
    pts, hidden, layers = mlp_files(b, 2, small=dev == "cpu")
    mib = layers * (hidden * hidden + hidden) * 4 / 2**20
    sts = []
    for i, pt in enumerate(pts):
        st = make_factory_copy(pt, b.dir(f"standby-factory-{i}"), hidden, layers)
        # Warm up as the TorchScript versions do, so both formats do the same work.
        write_manifest(os.path.join(os.path.dirname(st), "model.toml"), factory="net.py:build",
                       inputs=[InputSpec("float32", (1, hidden))],
                       warmup_batch_sizes=MLP_WARM_BATCHES)
        sts.append(st)
    preread(pts + sts)
    n = 2 if b.quick else max(3, b.args.upgrades)
    figures: dict[tuple[str, bool], dict[str, list[float]]] = {}
    for fmt, paths in (("safetensors", sts), ("torchscript", pts)):
        for standby in (False, True):
            figures[(fmt, standby)] = run_pool(b, dev, fmt, paths, hidden, standby, n)
    for fmt in ("safetensors", "torchscript"):
        off, on = figures[(fmt, False)], figures[(fmt, True)]
        b.compare(Compare("standby", f"spawn->ready {mib:.0f} MiB {fmt}", "standby",
                          statistics.median(on["s2r"]), "none", statistics.median(off["s2r"]),
                          "s", kind="max", target=0.15 if fmt == "safetensors" else 0.75,
                          note=f"median of {n} surge upgrades"))
        failed = int(sum(on["failed"]))
        b.compare(Compare("standby", f"drain-first {mib:.0f} MiB {fmt}, 8 clients: worst",
                          "standby", max(on["worst"]), "none", max(off["worst"]), "s",
                          kind="max", target=0.30 if fmt == "safetensors" else 0.50,
                          note=f"worst of {n} upgrades; failed {failed} (none: "
                               f"{int(sum(off['failed']))})"))
        if failed:
            raise BenchError(f"{failed} requests failed in drain-first upgrades ({fmt})")
    off, on = figures[("torchscript", False)], figures[("torchscript", True)]
    b.compare(Compare("standby", f"kill -9, {mib:.0f} MiB TorchScript, 4 clients: first "
                      "answer", "standby", statistics.median(on["kill"]), "none",
                      statistics.median(off["kill"]), "s", kind="max", target=0.30,
                      note=f"median of {len(on['kill'])} kills"))
    load_vs_bus(b, dev, sts[0], mib)


def run_pool(b: Any, dev: str, fmt: str, paths: list[str], hidden: int, standby: bool,
             n: int) -> dict[str, list[float]]:
    cfg = {"name": "m", "path": paths[0], "version": "v0", "devices": [dev], "max_batch": 8,
           "max_delay_ms": 1.0}
    if dev == "cpu":
        cfg["threads"] = 1
    out: dict[str, list[float]] = {"s2r": [], "worst": [], "failed": [], "kill": []}
    tag = f"{fmt}, standby {'on' if standby else 'off'}"
    with b.pool(f"standby-{fmt}-{int(standby)}", [cfg], boot_timeout_s=600.0,
                standby=standby, model_roots=[b.tmp]) as pool:
        version = 0

        def upgrade(strategy: str) -> dict[str, Any]:
            nonlocal version
            version += 1
            if standby:
                wait_standby(pool, dev)
            res = pool.ctl("upgrade", {"model": "m", "path": paths[version % 2],
                                       "version": f"v{version}", "strategy": strategy,
                                       "timeout_s": 600.0}, timeout_s=660.0)
            data: dict[str, Any] = res.get("data") or {}
            if not res.get("ok"):
                raise RuntimeError(f"upgrade failed: {res.get('error')} {data}")
            if standby and (data.get("standby") or {}).get("taken") != 1:
                raise RuntimeError(f"the upgrade did not start in the standby: {data}")
            return data

        for _ in range(n):
            data = upgrade("surge")
            wt = data["worker_timings"]
            out["s2r"].append(wt["spawn_to_ready_s"])
            b.rows.append({"section": "standby", "name": f"surge {tag}", **wt})
            print(f"  {tag:<26} surge: spawn->ready {wt['spawn_to_ready_s']:.3f}s "
                  f"(cuda {wt.get('cuda_init_s', 0):.3f}, confine {wt.get('confine_s', 0):.3f}"
                  f", load {wt.get('load_s', 0):.3f}, warm {wt.get('warm_s', 0):.3f}, "
                  f"arenas {wt.get('arenas_s', 0):.3f}; spawn->main {wt.get('to_main_s', 0):.3f}"
                  f", main->ready {wt.get('main_to_ready_s', 0):.3f}, ready event to poold "
                  f"{wt.get('ready_delivery_s', 0):.3f})", flush=True)
        with Clients(pool.frontend, "m", 8, hidden) as load:
            load.wait_answers(50)
            for _ in range(n):
                t0 = time.monotonic()
                data = upgrade("drain-first")
                t1 = time.monotonic()
                load.wait_answers(20)
                worst, reqs, failed = load.window(t0, t1)
                out["worst"].append(worst)
                out["failed"].append(failed)
                b.rows.append({"section": "standby", "name": f"drain-first {tag}",
                               "worst_s": worst, "requests": reqs, "failed": failed,
                               "phases": data.get("phases"), "elapsed_s": data.get("elapsed_s")})
                ph = data.get("phases") or {}
                held = " ".join(f"{k} {ph[k]:.3f}" for k in ("drain_s", "retire_s", "boot_s",
                                                             "held_s") if k in ph)
                wt = data.get("worker_timings") or {}
                steps = " ".join(f"{k.removesuffix('_s')} {wt[k]:.3f}" for k in WORKER_STEPS
                                 if k in wt)
                b.rows[-1]["worker_timings"] = wt
                print(f"  {tag:<26} drain-first: worst latency {worst:.3f}s over {reqs} "
                      f"requests, {failed} failed; upgrade {data.get('elapsed_s')}s "
                      f"{data.get('standby')}; held: {held}; worker after go: {steps}",
                      flush=True)
                staged = f"staged_s {ph['staged_s']:.3f}; " if "staged_s" in ph else ""
                print(f"  {'':<26} {staged}{load.where(t0, t1)}", flush=True)
        if fmt == "torchscript":
            with Clients(pool.frontend, "m", 4, hidden) as load:
                for _ in range(n):
                    if standby:
                        wait_standby(pool, dev)
                    pid = wait_serving(pool)
                    load.wait_answers(20)
                    t = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    # An answer the old worker sent just before it died can still be on
                    # its way for a moment; none from the replacement can be that early.
                    first = load.first_answer_after(t + STALE_S) + STALE_S
                    out["kill"].append(first)
                    new = wait_serving(pool, old_pid=pid)
                    workers = pool.ctl("status")["data"]["models"][0]["workers"]
                    pre = any(w.get("preloaded") for w in workers if w["pid"] == new)
                    b.rows.append({"section": "standby", "name": f"kill {tag}",
                                   "first_answer_s": first, "preloaded": pre})
                    print(f"  {tag:<26} kill -9 [pid {pid}]: first answer after "
                          f"{first:.3f}s (replacement pid {new}"
                          f"{', from the preload' if pre else ''})", flush=True)
    return out


def load_vs_bus(b: Any, dev: str, st: str, mib: float) -> None:
    from benchkit import Compare, readline

    p = b.procs.start([sys.executable, HERE, "load_vs_bus",
                       json.dumps({"path": st, "device": dev, "repeats": 5})], name="bus")
    try:
        res = json.loads(readline(p, 600, "load vs bus"))
    finally:
        b.procs.kill(p)
    b.rows.append({"section": "standby", "name": "load vs bus", **res})
    print(f"  safetensors load {res['load_s']:.4f}s ({res['load_gbs']:.1f} GB/s; its ring "
          f"unpinned after it, {res['free_s']:.4f}s, as a worker does after ready), staged "
          f"to device {res['staged_s']:.4f}s, pinned copy {res['bus_s']:.4f}s "
          f"({res['bus_gbs']:.1f} GB/s); read side alone, {res['threads']} threads x "
          f"{res['chunk_mib']} MiB: {res['read_s']:.4f}s ({res['read_gbs']:.1f} GB/s); "
          + (f"mapped path failed: {res['mapped_error']}" if res.get("mapped_error") else
             f"mapped path: {res['mapped_s']:.4f}s ({res['mapped_gbs']:.1f} GB/s)"),
          flush=True)
    if not res.get("mapped_error"):
        b.compare(Compare("standby", f"safetensors load {mib:.0f} MiB, mapped path / pinned copy",
                          "mapped", res["mapped_gbs"], "pinned copy", res["bus_gbs"], "GB/s",
                          target=None, note="GPU_POOL_WEIGHTS_PATH=mapped (not the default)"))
    b.compare(Compare("standby", f"safetensors load {mib:.0f} MiB / pinned H2D copy",
                      "load", res["load_gbs"], "pinned copy", res["bus_gbs"], "GB/s",
                      target=None if dev == "cpu" else 0.6,
                      note="medians; the ring pinned ahead, as in a standby"))


def role_load_vs_bus(cfg: dict[str, Any]) -> int:
    """In a process that brought its device up as a standby does: the median time of
    ``workers.weights.load_file``, of a staged file's ``to_device``, and of one pinned
    host->device copy of as many bytes."""
    import torch

    from workers import weights
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

    loads, frees, staged, bus, reads, mapped = [], [], [], [], [], []
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
                                                 ("mapped_s", mapped or [float("nan")]))}
    print(json.dumps({**med, "bytes": nbytes, "load_gbs": nbytes / med["load_s"] / 1e9,
                      "bus_gbs": nbytes / med["bus_s"] / 1e9,
                      "read_gbs": nbytes / med["read_s"] / 1e9,
                      "mapped_gbs": nbytes / med["mapped_s"] / 1e9,
                      "mapped_error": mapped_error,
                      "threads": weights.READ_THREADS, "chunk_mib": weights.CHUNK_BYTES >> 20,
                      "staged_gbs": nbytes / med["staged_s"] / 1e9,
                      "loads": loads, "bus": bus}), flush=True)
    return 0


def _time_mapped(path: str, dev: torch.device, sync: Callable[[], None],
                 into: list[float]) -> str | None:
    """One load by the mapped path (GPU_POOL_WEIGHTS_PATH=mapped), its seconds appended
    to ``into``; a failure is returned as text (the path is opt-in: the ring's figures
    stand without it)."""
    from workers import weights

    weights.defer_host_frees(dev.type == "cuda")
    t = time.monotonic()
    try:
        out = weights.load_file(path, dev, mapped=True)
        sync()
    except Exception as exc:  # noqa: BLE001 - any failure of the opt-in path is a finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        weights.defer_host_frees(False)
        weights.flush_host_frees()
    into.append(time.monotonic() - t)
    del out
    return None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "load_vs_bus":
        sys.exit(role_load_vs_bus(json.loads(sys.argv[2])))
    sys.exit("usage: bench.py --standby (this file's role: load_vs_bus CONFIG_JSON)")
