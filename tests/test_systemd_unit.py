"""scripts/systemd: the unit file and the example config."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "scripts" / "systemd"
UNIT = SYSTEMD_DIR / "gpu-pool.service"
EXAMPLE = SYSTEMD_DIR / "pool.toml.example"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> (key, value) in order; repeated keys (DeviceAllow=) are kept."""
    unit: Unit = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert not line.endswith("\\"), "continuation lines are not expected here"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        unit[section].append((key.strip(), value.strip()))
    return unit


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in parse_unit(UNIT.read_text())["Service"]:
        out.setdefault(key, []).append(value)
    return out


EXPECTED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": "/usr/local/bin/poold --config /etc/gpu-pool/pool.toml",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "KillMode": "mixed",
    "TimeoutStopSec": "60",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "2",
    "User": "gpu-pool",
    "Group": "gpu-pool",
    "RuntimeDirectory": "gpu-pool",
    "RuntimeDirectoryMode": "0700",
    "StateDirectory": "gpu-pool",
    "StateDirectoryMode": "0700",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "DevicePolicy": "closed",
    "ReadWritePaths": "/var/lib/gpu-pool /run/gpu-pool",
    "OOMPolicy": "continue",
}


@pytest.mark.parametrize(("key", "expected"), sorted(EXPECTED.items()))
def test_directive(service: dict[str, list[str]], key: str, expected: str) -> None:
    assert service.get(key) == [expected]


def test_environment(service: dict[str, list[str]]) -> None:
    assigned = dict(a.split("=", 1) for line in service["Environment"] for a in line.split())
    assert assigned["GPU_POOL_CONTROL"] == "ipc:///run/gpu-pool/control.sock"
    assert assigned["GPU_POOL_STATE_DIR"] == "/var/lib/gpu-pool"


def test_devices_allow_cuda(service: dict[str, list[str]]) -> None:
    allowed = {v.split()[0]: v.split()[1] for v in service["DeviceAllow"]}
    for node in ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"):
        assert allowed[node] == "rw"
    # Every /dev/nvidiaN on both driver flavours (major "nvidia" or "nvidia-frontend").
    assert allowed["char-nvidia*"] == "rw"


def test_settings_that_break_cuda_are_absent(service: dict[str, list[str]]) -> None:
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "SystemCallFilter"):
        assert key not in service
    # ... and the reason is written down next to the unit's hardening.
    text = UNIT.read_text()
    assert "MemoryDenyWriteExecute" in text and "PrivateDevices" in text


def test_stop_timeout_covers_drain(service: dict[str, list[str]]) -> None:
    pool = tomllib.loads(EXAMPLE.read_text())["pool"]
    assert int(service["TimeoutStopSec"][0]) > pool["drain_timeout_s"]


def test_example_config_has_every_key() -> None:
    config = tomllib.loads(EXAMPLE.read_text())
    pool_keys = {
        "frontend",
        "control",
        "state_dir",
        "metrics",
        "model_roots",
        "boot_timeout_s",
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "request_grace_s",
        "drain_timeout_s",
        "upgrade_timeout_s",
        "stop_timeout_s",
        "surge_margin_mb",
        "log_format",
        "log_level",
    }
    assert pool_keys <= config["pool"].keys()
    # CURVE is opt-in, so its keys are shown commented out.
    text = EXAMPLE.read_text()
    assert "# curve_secret_key = " in text and "# curve_authorized_keys = " in text

    model_keys = {
        "name",
        "path",
        "version",
        "devices",
        "max_batch",
        "max_delay_ms",
        "max_queue",
        "request_timeout_s",
        "retry_on_worker_loss",
        "max_requests",
        "max_requests_jitter",
        "max_rss_mb",
        "max_gpu_growth_mb",
        "threads",
    }
    first, *others = config["models"]
    assert model_keys <= first.keys()
    assert all({"name", "path"} <= m.keys() for m in others)
    assert config["pool"]["state_dir"] == "/var/lib/gpu-pool"
    assert config["pool"]["control"] == "ipc:///run/gpu-pool/control.sock"


def test_example_config_is_accepted_by_poold(tmp_path: Path) -> None:
    """The example must load with the daemon's own validator (paths moved into tmp)."""
    from pool.config import check_config

    models, state = tmp_path / "srv" / "models", tmp_path / "state"
    text = (
        EXAMPLE.read_text()
        .replace('"/srv/models', f'"{models}')
        .replace('"/var/lib/gpu-pool"', f'"{state}"')
    )
    for model in tomllib.loads(text)["models"]:
        Path(model["path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(model["path"]).write_bytes(b"")
    state.mkdir()
    config = tmp_path / "pool.toml"
    config.write_text(text)
    assert check_config(str(config), env={}) == []


def _verify(unit_text: str, tmp_path: Path) -> list[str]:
    """systemd-analyze verify a copy; returns its complaints about the unit."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    copy = tmp_path / UNIT.name  # verify wants the real unit name and suffix
    copy.write_text(unit_text)
    proc = subprocess.run(
        [exe, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys and unparsable values; it only warns, so
    # the warnings that name our file are what count.
    complaints = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if UNIT.name in line or str(copy) in line
    ]
    if proc.returncode != 0 and not complaints:
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()[:200]}")
    if proc.returncode != 0:
        complaints.append(f"exit status {proc.returncode}")
    return complaints


def _runnable(text: str) -> str:
    # verify checks that ExecStart's binary exists; poold is not installed in CI.
    return text.replace("ExecStart=/usr/local/bin/poold ", "ExecStart=/bin/true ")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/poold " in text
    assert _verify(_runnable(text), tmp_path) == []


def test_systemd_analyze_catches_mistakes(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are both reported."""
    text = _runnable(UNIT.read_text())
    broken = text.replace("WatchdogSec=30", "WatchdogSecs=30").replace(
        "KillMode=mixed", "KillMode=gently"
    )
    complaints = _verify(broken, tmp_path)
    assert any("WatchdogSecs" in c for c in complaints)
    assert any("gently" in c for c in complaints)
