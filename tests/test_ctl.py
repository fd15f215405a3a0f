"""pool-ctl as an operator meets it: usage errors, unknown models, dead or forbidden
sockets, the default endpoint under the systemd unit, plain output in pipes."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from modelkit import make_mlp
from poolkit import Pool, running_pool

from pool.ctl.endpoint import SYSTEM_CONTROL, choose_endpoint
from pool.ctl.render import print_status

CLI = [sys.executable, "-m", "pool.ctl.cli"]


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    "args",
    [
        ["--control", "foo", "status"],
        ["--control", "tcp://nohostport", "status"],
        ["--control", "ipc://", "status"],
        ["upgrade"],
        ["status", "--bogus"],
        ["--connect-timeout", "0", "status"],
    ],
)
def test_usage_errors_exit_2_with_a_message_and_no_traceback(args: list[str]) -> None:
    out = ctl(*args)
    assert out.returncode == 2, out
    assert "error:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_version_on_both_commands() -> None:
    for cmd in (CLI, [sys.executable, "-m", "pool.poold"]):
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.split()[1][0].isdigit(), out


def test_stale_socket_is_reported_as_such(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # bound, never listening: what a crashed poold leaves behind
    s.close()
    # A long connect timeout: only the kernel's ECONNREFUSED can end this quickly, and the
    # message says which path was taken.
    out = subprocess.run(
        [*CLI, "--control", f"ipc://{path}", "--connect-timeout", "300", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3 and "stale socket" in out.stderr, out


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_permission_denied_is_said_as_such(tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(d / "control.sock"))
    listener.listen(1)
    os.chmod(tmp_path, 0o755)
    try:
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *CLI]
            + ["--control", f"ipc://{d}/control.sock", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": "/nonexistent"},
        )
    finally:
        listener.close()
    assert out.returncode == 3 and "permission denied" in out.stderr, out


def test_default_endpoint_finds_the_system_unit_socket(tmp_path: Path) -> None:
    system = f"ipc://{tmp_path}/control.sock"
    bare = {"HOME": str(tmp_path / "home")}  # sudo -u gpu-pool: no XDG_RUNTIME_DIR, no home
    assert choose_endpoint(None, bare, system).endpoint != system  # nothing there yet
    Path(tmp_path / "control.sock").touch()
    assert choose_endpoint(None, bare, system).endpoint == system
    root = {"HOME": "/root", "XDG_RUNTIME_DIR": str(tmp_path / "user-run")}
    assert choose_endpoint(None, root, system).endpoint == system
    # An explicit choice, or the user's own running daemon, wins.
    (tmp_path / "user-run" / "gpu-pool").mkdir(parents=True)
    (tmp_path / "user-run" / "gpu-pool" / "control.sock").touch()
    assert choose_endpoint(None, root, system).endpoint.startswith(f"ipc://{tmp_path}/user-run")
    assert choose_endpoint("tcp://127.0.0.1:1", root, system).endpoint == "tcp://127.0.0.1:1"


def test_the_unit_and_pool_ctl_agree_on_the_system_socket() -> None:
    unit = Path(__file__).resolve().parent.parent / "scripts" / "systemd" / "gpu-pool.service"
    text = unit.read_text()
    assert f"GPU_POOL_CONTROL={SYSTEM_CONTROL}" in text
    assert "RuntimeDirectory=gpu-pool" in text


def test_a_spawning_worker_has_no_pid_yet_and_says_so() -> None:
    data = {
        "pid": 1,
        "models": [
            {
                "name": "m",
                "version": "1",
                "workers": [{"pid": None, "device": "cpu", "state": "spawning"}],
            }
        ],
    }
    buf = io.StringIO()
    with redirect_stdout(buf):
        print_status(data)
    row = buf.getvalue().splitlines()[-1]
    assert "None" not in row and row.startswith("(spawning)"), buf.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = str(tmp_path_factory.mktemp("ctl"))
    a = make_mlp(os.path.join(d, "models", "a.pt"), seed=1)
    name = "a-model-with-a-rather-long-name-for-wrapping"
    with running_pool(d, [{"name": name, "path": a, "version": "1", "devices": ["cpu"] * 3}]) as p:
        yield p


@pytest.mark.slow
def test_unknown_model_exits_1_with_a_message(pool: Pool) -> None:
    for args in (["history", "nosuch"], ["rollback", "nosuch"], ["upgrade", "nosuch", "/x"]):
        out = pool.pool_ctl(*args)
        assert out.returncode == 1, out
        assert "no model named 'nosuch'" in out.stderr + out.stdout
        assert "None" not in out.stdout


@pytest.mark.slow
def test_tables_in_a_pipe_are_plain_one_row_a_line(pool: Pool) -> None:
    out = pool.pool_ctl("status")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.split()[:1] and "cpu" in line]
    assert len(rows) == 3  # three workers, each whole on its own line
    assert all(len(r.split()) >= 9 for r in rows)
    assert not any(ch in out.stdout for ch in "┃│━─")
    hist = pool.pool_ctl("history", "a-model-with-a-rather-long-name-for-wrapping")
    assert hist.returncode == 0 and "committed" in hist.stdout


def test_each_worker_says_in_ps_which_model_version_and_device_it_serves(pool: Pool) -> None:
    m = pool.status()["models"][0]
    for w in m["workers"]:
        with open(f"/proc/{w['pid']}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode().strip()
        assert title.startswith(f"gpu-pool worker {m['name']} v1 cpu [{w['wid']}]"), title
    spawner = pool.status()["spawner_pid"]
    with open(f"/proc/{spawner}/cmdline", "rb") as f:
        assert f.read().startswith(b"gpu-pool spawner")


def test_hashing_progress_is_a_bar_on_a_terminal_and_absent_in_a_pipe(tmp_path: Path) -> None:
    import hashlib

    from pool.ctl.render import Progress
    from pool.state import file_digest

    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(3 << 20) * 7)  # 21 MiB, several 8 MiB reads
    done = [0]
    digest = file_digest(str(blob), done)
    assert done[0] == blob.stat().st_size
    assert digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    msgs = [
        {"phase": "digest", "path": str(blob)},
        {"phase": "hashing", "bytes": 7 << 20, "total": 21 << 20, "elapsed_s": 0.25},
        {"phase": "hashing", "bytes": 14 << 20, "total": 21 << 20, "elapsed_s": 0.5},
        {"phase": "strategy", "strategy": "surge", "elapsed_s": 0.7},
    ]
    term, pipe = io.StringIO(), io.StringIO()
    p_term, p_pipe = Progress(term, tty=True), Progress(pipe, tty=False)
    for m in msgs:
        p_term(m)
        p_pipe(m)
    assert "\r" in term.getvalue() and "14.0 MiB / 21.0 MiB  67%" in term.getvalue()
    assert term.getvalue().count("\n") == 3  # digest, the bar (ended before the next), strategy
    assert "MiB" not in pipe.getvalue() and len(pipe.getvalue().splitlines()) == 2
