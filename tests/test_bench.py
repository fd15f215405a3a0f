"""scripts/bench.py runs end to end on the CPU: the router and big-tensor sections, tiny.

No timing assertions: the figures only have to exist, be finite and positive, and be
printed next to their references with a ratio.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit import Compare  # noqa: E402


def test_a_missed_target_is_never_printed_as_the_target() -> None:
    def ratio(value: float) -> Compare:
        return Compare("s", "f", "pool", value, "ref", 10_000.0, "images/s", target=0.8)

    assert ratio(7_998.0).shown() == "0.7998x" and ratio(7_998.0).row()[6] == "NO"
    assert ratio(8_004.0).shown() == "0.80x" and ratio(8_004.0).met
    assert ratio(7_000.0).shown() == "0.70x"  # plainly missed: the usual two digits
    late = Compare("s", "p50", "pool", 300.4, "direct", 200.0, "us", kind="diff", target=100.0)
    assert late.shown() == "+100.4 us" and late.met is False
    assert Compare("s", "f", "a", 1.0, "b", 3.0, "x").shown() == "0.33x"  # no target
    # An absolute target ("max"): the value alone decides; the reference is shown beside.
    worst = Compare("s", "worst", "standby", 0.3004, "none", 1.4, "s", kind="max", target=0.3)
    assert worst.shown() == "0.3004 s" and worst.met is False and worst.row()[5] == "<= 0.3 s"
    assert Compare("s", "w", "a", 0.25, "b", 1.4, "s", kind="max", target=0.3).met


@pytest.mark.slow
def test_bench_router_and_big_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--router", "--big", "--quick", "--workers", "2",
           "--clients", "1,2", "--seconds", "0.3", "--big-mib", "2", "--json", str(out),
           "--rounds", "2", "--router-variants", "router_lane=false",
           "--tmp", str(tmp_path / "work")]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]

    # The machine header, both sections' comparison tables and the summary.
    assert "cores" in text and "torch" in text
    for title in ("== router", "-- router", "== big", "-- big", "== summary"):
        assert title in text, f"{title!r} missing:\n{text[-4000:]}"
    assert "ratio/diff" in text and "reference (same run)" in text

    data = json.loads(out.read_text())
    assert data["failed"] == []
    assert data["machine"]["cpus"] >= 1 and data["machine"]["date"]
    rows = [r for r in data["rows"] if "rps" in r]
    names = {(r["section"], r["name"]) for r in rows}
    assert ("router", "direct REQ->REP (model)") in names
    assert ("router", "zmq.proxy + 2 REP (model)") in names
    assert ("router", "pool (2 workers)") in names
    assert ("router", "pool router_lane=false") in names  # a bool option, parsed as one
    assert ("big", "pool (1 worker)") in names and ("big", "raw REQ->REP echo") in names
    # per round: direct x2, then proxy, pool and the variant at both client counts; big x2
    assert len(rows) == 2 * (2 + 2 + 2 + 2) + 2
    assert sorted({r.get("round") for r in rows if r["section"] == "router"}) == [1, 2]
    for r in rows:
        assert math.isfinite(r["rps"]) and r["rps"] > 0, r
        assert r["errors"] == 0, r
        assert r["requests"] >= r["clients"], r
        assert 0 < r["p50_us"] <= r["p99_us"], r

    comps = data["comparisons"]
    figures = {(c["section"], c["figure"], c["ref_name"]) for c in comps}
    assert ("router", "req/s, 2 clients", "zmq.proxy") in figures
    assert ("router", "p50, 1 client", "direct (model)") in figures
    assert ("big", "2 MiB each way", "raw REQ->REP") in figures
    for c in comps:
        assert math.isfinite(c["result"]) and math.isfinite(c["value"]), c
        assert c["value"] > 0 and c["ref"] > 0, c
        # each comparison is printed as one table row with its ratio or difference
        shown = f"{c['result']:.2f}x" if c["kind"] == "ratio" else f"{c['result']:+.0f} us"
        assert shown in text, (shown, text[-3000:])
    # Nothing the bench started outlives it (poold's command line names the work dir).
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, left


@pytest.mark.slow
def test_a_pool_whose_model_cannot_start_is_reported_at_once(tmp_path: Path) -> None:
    """benchkit_pool.start_pool gives up as soon as a model is marked failed, with
    poold's log, instead of waiting out its boot timeout (600 s in bench_standby)."""
    import time

    from benchkit import BenchError
    from benchkit_pool import start_pool
    from benchkit_procs import Procs

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    (tmp_path / "logs").mkdir()
    procs = Procs(str(tmp_path / "logs"))
    t0 = time.monotonic()
    try:
        with pytest.raises(BenchError, match="failed to start") as err:
            start_pool(procs, str(tmp_path / "pool"), [{"name": "m", "path": str(bad),
                       "devices": ["cpu"], "threads": 1}], boot_timeout_s=600.0)
    finally:
        procs.kill_all()
    assert time.monotonic() - t0 < 120
    assert "bad.pt" in str(err.value)  # the log tail says which file and why
