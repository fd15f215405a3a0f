"""scripts/stress.py: the verdict on synthetic samples, and real runs of the script.

The real runs start the script as a subprocess (it starts its own poold) on the CPU with
the small model; together they take about a minute on a 2-core machine.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import stress  # noqa: E402
from stresskit import MiB, Sample, slope  # noqa: E402

KiB = 1024


# ------------------------------------------------------------------ the verdict, unit
def sample(cycle: int, **kw: Any) -> Sample:
    base = Sample(
        cycle=cycle, t_s=float(cycle), action="upgrade", strategy="surge", version="1",
        committed=True, elapsed_s=1.0, call_s=1.5, sample_s=0.1, bytes_freed=1500 * MiB,
        device_used=2000 * MiB, device_retired=2000 * MiB, residue=0,
        workers_gpu_bytes=1500 * MiB, workers=1,
        rss=40 * MiB, fds=30, threads=5, children=1, spawner_children=1, zombies=0,
        orphans=0, requests=100, failed_total=0, p50_ms=2.0, p99_ms=9.0,
        max_ms=20.0)
    return replace(base, **kw)


def run_of(n: int = 20, **per_cycle: Any) -> list[Sample]:
    """``n`` clean samples; a keyword's value is a function of the cycle number."""
    return [sample(c, **{k: f(c) for k, f in per_cycle.items()}) for c in range(1, n + 1)]


def failing(checks: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in checks if not c["ok"]]


def judge(samples: list[Sample], gpu: bool = True) -> list[dict[str, Any]]:
    return stress.judge(samples, gpu=gpu, rss_slope_max=256 * KiB)


def test_slope_is_least_squares() -> None:
    assert slope([1, 2, 3, 4], [10, 12, 14, 16]) == pytest.approx(2.0)
    assert slope([1, 2, 3], [5, 9, 5]) == pytest.approx(0.0)
    assert slope([1], [5]) == 0.0


def test_a_clean_run_passes() -> None:
    checks = judge(run_of())
    assert failing(checks) == []
    names = {c["name"] for c in checks}
    assert {"failed requests", "updates committed", "device drift", "RSS slope",
            "descriptors", "zombies", "orphans"} <= names


def test_device_drift_fails_above_16_mib() -> None:
    leak = run_of(device_used=lambda c: 2000 * MiB + c * MiB)  # 19 MiB from first to last
    checks = judge(leak)
    assert failing(checks) == ["device drift"]
    assert next(c for c in checks if c["name"] == "device drift")["value"] == 19 * MiB
    assert failing(judge(run_of(device_used=lambda c: 2000 * MiB + (c % 2) * 8 * MiB))) == []


def test_device_drift_is_not_judged_on_the_cpu() -> None:
    leak = run_of(device_used=lambda c: None)
    assert "device drift" not in {c["name"] for c in judge(leak, gpu=True)}
    grown = run_of(device_used=lambda c: c * 100 * MiB)
    assert "device drift" not in {c["name"] for c in judge(grown, gpu=False)}


def test_rising_rss_fails_and_warm_up_is_skipped() -> None:
    rising = run_of(rss=lambda c: 40 * MiB + c * 300 * KiB)
    checks = judge(rising)
    assert failing(checks) == ["RSS slope"]
    k = next(c for c in checks if c["name"] == "RSS slope")["value"]
    assert k == pytest.approx(300 * KiB)
    # a jump during the first three cycles (imports, caches) is warm-up, not a leak
    warm = run_of(rss=lambda c: 40 * MiB + min(c, 3) * 20 * MiB + (c % 2) * 64 * KiB)
    assert failing(judge(warm)) == []


@pytest.mark.parametrize("field,bad,check", [
    ("failed_total", lambda c: 1 if c > 10 else 0, "failed requests"),
    ("committed", lambda c: c != 7, "updates committed"),
    ("zombies", lambda c: 1 if c == 20 else 0, "zombies"),
    ("orphans", lambda c: 1 if c == 20 else 0, "orphans"),
    ("fds", lambda c: 30 + c, "descriptors"),
    ("spawner_children", lambda c: 2, "stray children"),
])
def test_each_leak_fails_its_own_check(field: str, bad: Any, check: str) -> None:
    assert failing(judge(run_of(**{field: bad}))) == [check]


def test_no_traffic_no_cycles_or_a_short_run_fails() -> None:
    assert failing(judge(run_of(requests=lambda c: 0))) == ["failed requests"]
    assert failing(judge([])) == ["cycles"]
    short = stress.judge(run_of(12), gpu=True, rss_slope_max=256 * KiB, cycles=20)
    assert failing(short) == ["cycles"]


# ------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The two small model versions, written once (in this process: pytest has torch)."""
    import stresskit

    directory = str(tmp_path_factory.mktemp("stress-models"))
    stresskit._make_models(directory, "small")
    return directory


def run_stress(out: Path, models: str, *args: str, timeout: float = 150) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "stress.py"), "--device", "cpu",
         "--model-size", "small", "--models-dir", models, "--out", str(out), *args],
        capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def summary_of(out: Path) -> dict[str, Any]:
    for name in ("samples.csv", "summary.json", "stress.png"):
        assert (out / name).stat().st_size > 0, name
    return dict(json.loads((out / "summary.json").read_text()))


@pytest.fixture(scope="module")
def surge_run(models: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("surge")
    code, log = run_stress(out, models, "--cycles", "20", "--clients", "4",
                           "--strategy", "surge", "--rollback-every", "5")
    assert code == 0, log
    return out


@pytest.mark.slow
def test_twenty_surge_cycles_with_rollbacks_leak_nothing(surge_run: Path) -> None:
    s = summary_of(surge_run)
    assert s["verdict"] == "pass" and s["pass"] is True
    assert s["cycles"] == 20 and s["updates_committed"] == 20
    assert s["failed_requests"] == 0 and s["requests"] > 0
    assert s["zombies"] == 0 and s["orphans"] == 0
    assert s["rss_slope_bytes_per_cycle"] < s["rss_slope_max"] == 256 * KiB
    with open(surge_run / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["action"] for r in rows].count("rollback") == 4
    assert {r["version"] for r in rows} == {"1", "2"}
    assert all(r["strategy"] == "surge" for r in rows)
    assert all(int(r["fds"]) > 0 and int(r["spawner_children"]) == 1 for r in rows)


@pytest.mark.slow
def test_drain_first_cycles_leak_nothing(models: str, tmp_path: Path) -> None:
    code, log = run_stress(tmp_path, models, "--cycles", "6", "--clients", "3",
                           "--strategy", "drain-first")
    assert code == 0, log
    s = summary_of(tmp_path)
    assert s["verdict"] == "pass" and s["strategy"] == "drain-first"
    assert s["failed_requests"] == 0 and s["zombies"] == 0 and s["orphans"] == 0
    assert s["updates_committed"] == 6


@pytest.mark.slow
def test_in_process_run_can_fail_and_compare_draws_both(models: str, surge_run: Path,
                                                        tmp_path: Path) -> None:
    inproc = tmp_path / "inproc"
    # A negative RSS limit no slope can meet: the same outputs, a failed verdict, exit 1.
    code, log = run_stress(inproc, models, "--mode", "in-process", "--cycles", "5",
                           "--clients", "2", "--rss-slope-max", "-1")
    assert code == 1, log
    s = summary_of(inproc)
    assert s["verdict"] == "fail" and s["mode"] == "in-process"
    assert failing(s["checks"]) == ["RSS slope"]
    assert s["failed_requests"] == 0 and s["requests"] > 0
    assert "FAIL RSS slope" in log
    assert stress.main(["--compare", str(surge_run), str(inproc), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare.png").stat().st_size > 0
