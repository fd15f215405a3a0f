"""Operator-level guards of issue 17, each against a real poold on the CPU: a manifest's
golden file stays inside the model roots, run directories that SIGKILLed pooldes left are
removed at start (only those), and hang detection takes seconds without mistaking a long
forward for a hang."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from modelkit import make_factory_model, make_mlp, mlp_input, mlp_reference
from poolkit import running_pool, short_dir, start_pool, wait_for

from workers.manifest import InputSpec, write_manifest

pytestmark = pytest.mark.slow


# ------------------------------------------------- golden.file inside the model roots
def mlp_with_golden_at(root: Path, version: str, seed: int, golden: Path) -> str:
    """An MLP under ``root/version`` whose manifest's golden file (valid for the model)
    has been moved to ``golden`` and is named relative to the manifest."""
    path = make_mlp(str(root / version / "mlp.pt"), seed=seed)
    golden.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(root / version / "mlp.golden.npz"), golden)
    write_manifest(
        str(root / version / "mlp.toml"),
        inputs=[InputSpec("float32", (1, 16))],
        warmup_batch_sizes=(1, 4),
        golden_file=os.path.relpath(golden, root / version),
    )
    return path


def test_golden_file_outside_the_model_roots_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "outside"
    v1 = make_mlp(str(root / "v1" / "mlp.pt"), seed=1)
    evil = mlp_with_golden_at(root, "v2", 2, outside / "golden.npz")
    fine = mlp_with_golden_at(root, "v3", 3, root / "shared" / "golden.npz")
    models = [{"name": "mlp", "path": v1, "version": "1", "devices": ["cpu"]}]
    with running_pool(str(tmp_path), models, model_roots=[str(root)]) as pool:
        done = pool.pool_ctl("upgrade", "mlp", evil, "--version", "2", timeout=60)
        out = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 1, out
        assert f"{outside / 'golden.npz'} is outside the model roots: {root}" in out, out
        assert pool.model("mlp")["version"] == "1"
        # The roots are the bound, not the manifest's directory: a golden file elsewhere
        # inside them is read and checked.
        done = pool.pool_ctl("upgrade", "mlp", fine, "--version", "3", timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        with pool.client(retries=1, timeout=10) as c:
            x = mlp_input(2)
            r = c.infer("mlp", x)
        assert r.version == "3"
        np.testing.assert_allclose(r.outputs[0], mlp_reference(3, x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- stale run directories
def run_dirs(parent: str) -> set[str]:
    return {n for n in os.listdir(parent) if n.startswith("gpu-pool-")}


def test_stale_run_directories_are_removed_at_start(tmp_path: Path) -> None:
    path = make_mlp(str(tmp_path / "models" / "mlp.pt"), seed=1)
    models = [{"name": "mlp", "path": path, "devices": ["cpu"]}]
    tmpdir = short_dir()
    first = start_pool(str(tmp_path / "a"), models, env_extra={"TMPDIR": tmpdir})
    (left,) = run_dirs(tmpdir)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    # Not stale: a live process's, one without a pid file, a file, and a symlink to a
    # dead poold's directory elsewhere (a symlink is never followed).
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = Path(tmpdir) / "gpu-pool-live"
        live.mkdir()
        (live / "poold.pid").write_text(f"{sleeper.pid}\n")
        (Path(tmpdir) / "gpu-pool-nopid").mkdir()
        (Path(tmpdir) / "gpu-pool-file").write_text("x")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "poold.pid").write_text("999999999\n")
        (Path(tmpdir) / "gpu-pool-link").symlink_to(elsewhere)
        assert left in run_dirs(tmpdir)
        second = start_pool(str(tmp_path / "b"), models, env_extra={"TMPDIR": tmpdir})
        try:
            kept = run_dirs(tmpdir)
            assert left not in kept, kept
            assert {"gpu-pool-live", "gpu-pool-nopid", "gpu-pool-file", "gpu-pool-link"} <= kept
            assert (elsewhere / "poold.pid").exists()
            assert f"removed stale run directory {tmpdir}/{left}" in second.log()
        finally:
            second.stop()
        assert run_dirs(tmpdir) == {
            "gpu-pool-live",
            "gpu-pool-nopid",
            "gpu-pool-file",
            "gpu-pool-link",
        }  # its own removed at exit
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------- hang detection in seconds
def test_a_long_forward_is_busy_not_hung_and_a_stopped_worker_is_replaced(
    tmp_path: Path,
) -> None:
    """heartbeat_timeout_s 1.5: a forward computing for 4 s (silent all that time) is
    answered by the same worker; a SIGSTOPped worker is replaced within seconds."""
    busy = make_factory_model(
        str(tmp_path / "busy"), seed=6, forward="busy", busy_s=4.0, only_if_negative=True
    )
    models = [{"name": "busy", "path": busy, "devices": ["cpu", "cpu"], "threads": 1}]
    with running_pool(
        str(tmp_path), models, heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5
    ) as pool:
        before = {w["pid"] for w in pool.model("busy")["workers"]}
        x = -mlp_input(1)
        with pool.client(retries=0, timeout=20) as c:
            t0 = time.monotonic()
            r = c.infer("busy", x)
            took = time.monotonic() - t0
        assert took >= 4.0, took
        np.testing.assert_allclose(r.outputs[0], mlp_reference(6, x), rtol=1e-5, atol=1e-6)
        assert {w["pid"] for w in pool.model("busy")["workers"]} == before
        assert "hung" not in pool.log()

        victim = min(before)
        os.kill(victim, signal.SIGSTOP)
        t0 = time.monotonic()

        def replaced() -> bool:
            pids = {w["pid"] for w in pool.model("busy")["workers"] if w["state"] == "ready"}
            return victim not in pids and len(pids) == 2

        wait_for(replaced, 20, "the stopped worker replaced")
        assert time.monotonic() - t0 < 12
        assert "no CPU time used" in pool.log()
