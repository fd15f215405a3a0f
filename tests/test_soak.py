"""scripts/soak.py runs end to end for a few seconds (the full 10 minutes are run by
hand; docs/OPERATIONS.md has its output)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_short_soak_loses_nothing(tmp_path: object) -> None:
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "soak.py"),
            "--minutes",
            "0.1",
            "--connections",
            "300",
            "--json",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads(done.stdout)
    assert s["verdict"]["ok"] and s["verdict"]["lost"] == 0, s
    assert s["answers_by_code"].get("OK", 0) > 0, s
    events = s["events"]
    assert events.get("workers killed", 0) >= 2, events
    assert events.get("fuzz sent", 0) > 0 and events.get("slow reader sent", 0) > 0, events
    assert events.get("connections held (max)") == 300, events
    assert s["poold_start"]["rss"] and s["poold_end"]["fds"], s


@pytest.mark.slow
def test_a_short_soak_with_the_http_gateway_loses_nothing(tmp_path: object) -> None:
    """--oip: checked OIP/HTTP clients beside the ZeroMQ ones and a peer misbehaving at
    the HTTP level, while workers are killed and versions change; the gateway keeps its
    pid and its descriptors."""
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "soak.py"), "--minutes", "0.25",
         "--connections", "100", "--oip", "--json", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads(done.stdout)
    v, events = s["verdict"], s["events"]
    assert v["ok"] and v["lost"] == 0 and v["wrong"] == 0, s
    assert v["gateway_kept"] and v["gateway_fd_growth"] <= 8, v
    assert events.get("OIP requests", 0) > 0 and events.get("workers killed", 0) >= 2, events
    assert s["poold_start"]["gateway"]["pid"], s
