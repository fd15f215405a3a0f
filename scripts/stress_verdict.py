"""The stress run's verdict: every check on the samples (failed requests, updates not
committed, device drift, RSS slope, descriptors, threads, zombies, orphans, stray
children), each a {"name", "ok", "value", "limit", "detail"} record; docs/STRESS.md
explains each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stresskit import (  # (stresskit puts the project root on sys.path)
    MiB,
    Sample,
    slope,
)

DRIFT_MAX = 16 * MiB
WARMUP_CYCLES = 3
FD_GROWTH_MAX = 8
THREAD_GROWTH_MAX = 4
Check = dict[str, Any]

# What a mode's runner returns: the samples, the first errors, every latency (ms), and
# its own extra checks.
Run = tuple[list[Sample], list[str], list[float], list[Check]]


def judge(samples: Sequence[Sample], *, gpu: bool, rss_slope_max: float,
          cycles: int | None = None, warmup: int = WARMUP_CYCLES, drift_max: int = DRIFT_MAX,
          fd_growth_max: int = FD_GROWTH_MAX,
          thread_growth_max: int = THREAD_GROWTH_MAX) -> list[Check]:
    """Every check of a run, each {"name", "ok", "value", "limit", "detail"}."""
    if not samples:
        return [check("cycles", False, 0, cycles, "no cycle ran")]
    first, last = samples[0], samples[-1]
    ran = [] if cycles is None or len(samples) == cycles else [
        check("cycles", False, len(samples), cycles,
               f"{len(samples)} of {cycles} cycles ran: the run was cut short")]
    steady = list(samples[warmup:])
    requests = sum(s.requests for s in samples)
    checks = ran + [
        check("failed requests", last.failed_total == 0 and requests > 0, last.failed_total,
               0, f"{last.failed_total} failed of {requests + last.failed_total}"
               + ("" if requests else " (no request was answered at all)")),
        check("updates committed", all(s.committed for s in samples),
               sum(not s.committed for s in samples), 0,
               f"{sum(s.committed for s in samples)} of {len(samples)} committed"),
    ]
    if gpu and first.device_used is not None and last.device_used is not None:
        drift = last.device_used - first.device_used
        checks.append(check("device drift", abs(drift) <= drift_max, drift, drift_max,
                             f"{drift / MiB:+.1f} MiB between cycle {first.cycle} and "
                             f"{last.cycle} (limit {drift_max / MiB:.0f} MiB)"))
    pts = [(s.cycle, s.rss) for s in steady if s.rss is not None]
    if len(pts) >= 2:
        k = slope([c for c, _ in pts], [r for _, r in pts])
        checks.append(check("RSS slope", k <= rss_slope_max, k, rss_slope_max,
                             f"{k / 1024:+.1f} KiB/cycle over cycles {pts[0][0]}-{pts[-1][0]} "
                             f"(limit {rss_slope_max / 1024:.0f} KiB/cycle)"))
    else:
        checks.append(check("RSS slope", True, None, rss_slope_max,
                             f"not judged: fewer than 2 cycles after {warmup} of warm-up"))
    ref = samples[min(warmup, len(samples) - 1)]
    for name, key, limit in (("descriptors", "fds", fd_growth_max),
                             ("threads", "threads", thread_growth_max)):
        a, b = getattr(ref, key), getattr(last, key)
        if a is not None and b is not None:
            checks.append(check(name, b - a <= limit, b - a, limit,
                                 f"{a} at cycle {ref.cycle}, {b} at cycle {last.cycle} "
                                 f"(growth limit {limit})"))
    checks.append(check("zombies", last.zombies == 0, last.zombies, 0,
                         f"{last.zombies} at the end"))
    checks.append(check("orphans", last.orphans == 0, last.orphans, 0,
                         f"{last.orphans} at the end"))
    if last.spawner_children is not None:
        stray = last.spawner_children - last.workers
        checks.append(check("stray children", stray <= 0, stray, 0,
                             f"spawner has {last.spawner_children} children for "
                             f"{last.workers} live workers"))
    return checks


def check(name: str, ok: bool, value: Any, limit: Any, detail: str) -> Check:
    return {"name": name, "ok": bool(ok), "value": value, "limit": limit, "detail": detail}
