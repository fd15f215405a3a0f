"""The weights section: torch.jit.load against the safetensors factory format, per device."""

from __future__ import annotations

import json
import statistics

from bench_harness import Bench, mlp_files
from benchkit import (
    Compare,
    readline,
)


def section_weights(b: Bench) -> None:
    from benchmodels import make_factory_copy

    devices = (["cuda:0"] if b.info["cuda"] else []) + ["cpu"]
    print(f"\n== weights: torch.jit.load vs safetensors factory format, on "
          f"{', '.join(devices)}, from page cache", flush=True)
    paths, hidden, layers = mlp_files(b, 1, small=False)
    st = make_factory_copy(paths[0], b.dir(f"factory-{hidden}x{layers}"), hidden, layers)
    # (the load_weights role reads both files into the page cache itself)
    for dev in devices:
        p = b.procs.role("load_weights", {"pt": paths[0], "st": st, "device": dev,
                                          "repeats": b.args.weight_repeats})
        try:
            res = json.loads(readline(p, 600, f"weights load on {dev}"))
        finally:
            b.procs.kill(p)
        nbytes = res["param_bytes"]
        rate = {}
        for fmt, times in res["times"].items():
            t = statistics.median(times)
            rate[fmt] = nbytes / t / 1e9
            b.rows.append({"section": "weights", "name": f"{fmt} -> {dev}", "bytes": nbytes,
                           "times_s": times, "median_s": t, "gb_per_s": rate[fmt]})
            print(f"  {fmt:<12} -> {dev:<6} {nbytes / 2**20:.0f} MiB: median {t:.3f}s "
                  f"= {rate[fmt]:.2f} GB/s (runs: {', '.join(f'{x:.3f}' for x in times)})",
                  flush=True)
        cpu = dev == "cpu"
        b.compare(Compare("weights", f"load {nbytes / 2**20:.0f} MiB -> {dev}", "safetensors",
                          rate["safetensors"], "torch.jit.load", rate["torchscript"], "GB/s",
                          target=None if cpu else 5.0,
                          note="CPU: safetensors maps the file, no copy" if cpu else ""))
