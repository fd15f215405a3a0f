"""The stress run's outputs: the progress line per cycle, summary.json, the verdict as
printed, and the comparison of two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
from stress_verdict import Check
from stresskit import (  # (stresskit puts the project root on sys.path)
    MiB,
    Sample,
    percentile,
    plot_compare,
    read_csv,
)


def fmt_bytes(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:.1f}M"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


def progress_line(s: Sample, cycles: int) -> str:
    w = len(str(cycles))
    el = "-" if s.elapsed_s is None else f"{s.elapsed_s:.2f}s"
    return (f"[{s.cycle:>{w}}/{cycles}] {s.action:<8} -> {s.version[:12]:<4} "
            f"{s.strategy:<11} {'ok ' if s.committed else 'NOT'} {el:>6} "
            f"freed {fmt_bytes(s.bytes_freed)} | dev {fmt_bytes(s.device_used)} "
            f"res {fmt_bytes(s.residue)} wgpu {fmt_bytes(s.workers_gpu_bytes)} | "
            f"rss {fmt_bytes(s.rss)} fds {s.fds} thr {s.threads} kids {s.children}/"
            f"{'-' if s.spawner_children is None else s.spawner_children} | "
            f"zomb {s.zombies} orph {s.orphans} | req {s.requests} fail {s.failed_total} "
            f"p50 {fmt_ms(s.p50_ms)} p99 {fmt_ms(s.p99_ms)} max {fmt_ms(s.max_ms)}"
            + (f" | {s.error}" if s.error else ""))


def stats(values: Sequence[float | int | None]) -> dict[str, float | None]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "p50": None, "max": None, "min": None}
    return {"mean": float(np.mean(v)), "p50": float(np.median(v)), "max": max(v), "min": min(v)}


def summarize(args: argparse.Namespace, samples: list[Sample], checks: list[Check],
              errors: list[str], lat: list[float], wall_s: float) -> dict[str, Any]:
    ok = all(c["ok"] for c in checks)
    by = {c["name"]: c for c in checks}
    last = samples[-1] if samples else None
    return {
        "verdict": "pass" if ok else "fail",
        "pass": ok,
        "mode": args.mode,
        "strategy": args.strategy if args.mode == "pool" else "in-process",
        "standby": bool(args.standby),
        "device": args.device,
        "model_size": args.model_size,
        "cycles": len(samples),
        "clients": args.clients,
        "rollback_every": args.rollback_every,
        "requests": sum(s.requests for s in samples),
        "failed_requests": last.failed_total if last else 0,
        "errors": errors,
        "zombies": last.zombies if last else None,
        "orphans": last.orphans if last else None,
        "rss_slope_bytes_per_cycle": by.get("RSS slope", {}).get("value"),
        "rss_slope_max": args.rss_slope_max,
        "device_drift_bytes": by.get("device drift", {}).get("value"),
        "updates_committed": sum(s.committed for s in samples),
        "updates_not_committed": sum(not s.committed for s in samples),
        "update_s": stats([s.elapsed_s for s in samples]),
        "call_s": stats([s.call_s for s in samples]),
        "cycle_s": (samples[-1].t_s - samples[0].t_s) / (len(samples) - 1)
        if len(samples) > 1 else None,
        "bytes_freed": stats([s.bytes_freed for s in samples]),
        "residue_bytes": stats([s.residue for s in samples]),
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                       "max": max(lat, default=None)},
        "checks": checks,
        "machine": machine(),
        "wall_s": round(wall_s, 1),
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["gpus"] = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                        for i in range(pynvml.nvmlDeviceGetCount())]
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        info["gpus"] = []
    return info


def print_verdict(summary: dict[str, Any], out: Any) -> None:
    how = "in-process swap" if summary["mode"] == "in-process" else summary["strategy"]
    print(f"verdict: {summary['verdict'].upper()} ({how}, {summary['cycles']} cycles, "
          f"{summary['requests']} requests)", file=out)
    for c in summary["checks"]:
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']:<18} {c['detail']}", file=out)


def compare(dirs: Sequence[str], out_dir: str) -> int:
    runs = []
    for d in dirs:
        with open(os.path.join(d, "summary.json")) as f:
            summary = json.load(f)
        label = (f"gpu-pool ({summary['strategy']})" if summary["mode"] == "pool"
                 else "in-process swap")
        runs.append((label, read_csv(os.path.join(d, "samples.csv")), summary))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compare.png")
    plot_compare([(label, samples) for label, samples, _ in runs], path)
    for label, samples, summary in runs:
        res = summary["residue_bytes"]
        print(f"{label:<26} {summary['cycles']:>4} cycles  drift "
              f"{fmt_bytes(summary['device_drift_bytes'])}  residue last "
              f"{fmt_bytes(samples[-1].residue if samples else None)} max "
              f"{fmt_bytes(res['max'])}  RSS slope "
              f"{(summary['rss_slope_bytes_per_cycle'] or 0) / 1024:+.1f} KiB/cycle  "
              f"{summary['verdict']}")
    print(f"wrote {path}")
    return 0
