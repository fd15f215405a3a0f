"""poold at its limits, driven as an attacker or an unlucky operator would: descriptors
run out, the state disk is full or read-only, SIGTERM under load (issue 17)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import Pool, running_pool, start_pool, wait_for

PROTO = b"gpu-pool/1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(model: str, x: np.ndarray, timeout_ms: int = 60_000) -> list[bytes]:
    header = msgpack.packb(
        {
            "model": model,
            "inputs": [{"dtype": "float32", "shape": list(x.shape)}],
            "timeout_ms": timeout_ms,
        }
    )
    return [b"", PROTO, header, x.tobytes()]


def reply_code(frames: list[bytes]) -> str:
    reply = msgpack.unpackb(frames[2])
    return "OK" if reply["ok"] else str(reply["error"]["code"])


def output(frames: list[bytes]) -> np.ndarray:
    """The first output of an ok reply, inline or in the frame after the header."""
    out = msgpack.unpackb(frames[2])["outputs"][0]
    data = out["data"] if "data" in out else frames[3]
    return np.frombuffer(data, np.dtype(out["dtype"])).reshape(out["shape"])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gpupool_frontend"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def own_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_descriptor_exhaustion_from_clients_never_aborts_poold(tmp_path: object) -> None:
    """2,000 TCP clients against a poold started under ``ulimit -n 1024``: poold stays up,
    refuses past its limit with a metric and a log line, keeps pool-ctl and replacement
    workers working, and answers every client once others leave."""
    clients = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 3 * clients + 200  # each DEALER: a connection and a mailbox
    if hard < need:
        pytest.skip(f"this test needs {need} descriptors in the test process (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    d = str(tmp_path)
    model = make_mlp(os.path.join(d, "m", "m.pt"), seed=4)
    port, mport = free_port(), free_port()
    with running_pool(
        d,
        [{"name": "m", "path": model, "devices": ["cpu"], "max_queue": 4096}],
        nofile=1024,
        frontend=f"tcp://127.0.0.1:{port}",
        metrics=f"127.0.0.1:{mport}",
    ) as pool:
        limit = scrape(mport)["gpupool_frontend_connection_limit"]
        assert 16 <= limit < 1024 - 200
        ctx = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, clients + 16)
        x = mlp_input(1, seed=3)
        want = mlp_reference(4, x)
        socks = []
        try:
            for _ in range(clients):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RECONNECT_IVL, 100)
                s.connect(f"tcp://127.0.0.1:{port}")
                s.send_multipart(request("m", x), copy=False)
                socks.append(s)
            wait_for(lambda: scrape(mport)["gpupool_frontend_full"] == 1, 60, "the door to shut")
            assert pool.proc.poll() is None
            assert own_fds(pool.proc.pid) < 1024 - 64
            # pool-ctl still gets in, and so does a replacement worker.
            victim = pool.model("m")["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: (
                    [w["pid"] for w in pool.model("m")["workers"] if w["state"] == "ready"]
                    not in ([], [victim])
                ),
                60,
                "a replacement worker",
            )
            # Every client is answered: the connected ones first; as they leave, the door
            # opens for the rest. A client whose connection was closed past the limit
            # retries after a silence, as a REQ client with a timeout does.
            answered: set[int] = set()
            sent_at = dict.fromkeys(range(clients), time.monotonic())
            retried = 0

            def collect() -> bool:
                nonlocal retried
                now = time.monotonic()
                for i in range(clients):
                    if i in answered:
                        continue
                    s = socks[i]
                    if s.poll(0):
                        frames = s.recv_multipart()
                        assert reply_code(frames) == "OK", reply_code(frames)
                        np.testing.assert_allclose(output(frames), want, rtol=1e-5, atol=1e-6)
                        answered.add(i)
                        s.close()  # leaving makes room at the door
                    elif now - sent_at[i] > 30:
                        s.close()
                        socks[i] = s = ctx.socket(zmq.DEALER)
                        s.setsockopt(zmq.LINGER, 0)
                        s.connect(f"tcp://127.0.0.1:{port}")
                        s.send_multipart(request("m", x), copy=False)
                        sent_at[i] = now
                        retried += 1
                return len(answered) == clients

            wait_for(collect, 240, "an answer for every client", interval=0.2)
            assert pool.proc.poll() is None
            log = pool.log()
            assert "refusing new ones" in log and "open again" in log
            # How many connections the door closed varies from run to run, and a client
            # closed there may need no retry (a DEALER keeps a message its connection had
            # not written and sends it on reconnect): every client answered, with the door
            # seen shut above, is the guarantee.
        finally:
            for s in socks:
                s.close(linger=0)
            ctx.term()
        assert "Too many open files" not in pool.log()


@pytest.mark.slow
def test_sigterm_answers_every_request_it_accepted(tmp_path: object) -> None:
    """REQ clients sending without pause through SIGTERM, and new ones arriving while
    poold drains: every request gets a reply (its answer or SHUTTING_DOWN); a client
    stops at SHUTTING_DOWN, as PROTOCOL.md tells it to."""
    d = str(tmp_path)
    model = make_mlp(os.path.join(d, "m", "m.pt"), seed=4)
    x = mlp_input(1, seed=3)
    lost: list[str] = []
    codes: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(endpoint: str, once: bool) -> None:
        ctx = zmq.Context.instance()
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        try:
            while not stop.is_set():
                s.send_multipart(request("m", x)[1:])
                if not s.poll(8_000):
                    with lock:
                        lost.append(endpoint)
                    return
                code = reply_code([b"", *s.recv_multipart()])
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                if code == "SHUTTING_DOWN" or once:
                    return
        finally:
            s.close()

    pool = start_pool(d, [{"name": "m", "path": model, "devices": ["cpu", "cpu"]}])
    try:
        steady = [threading.Thread(target=client, args=(pool.frontend, False)) for _ in range(16)]
        for t in steady:
            t.start()
        wait_for(lambda: codes.get("OK", 0) > 200, 60, "steady traffic")
        pool.proc.send_signal(signal.SIGTERM)
        late = []
        draining = time.monotonic() + 0.3
        while pool.proc.poll() is None and time.monotonic() < draining:
            t = threading.Thread(target=client, args=(pool.frontend, True))
            t.start()
            late.append(t)
            time.sleep(0.002)
        for t in steady + late:
            t.join(30)
        assert pool.proc.wait(30) == 0
    finally:
        stop.set()
        pool.stop()
    assert not lost, f"{len(lost)} requests got no reply; replies: {codes}"
    assert codes.get("SHUTTING_DOWN", 0) >= 16


@contextlib.contextmanager
def small_tmpfs(path: str, size: str = "1m") -> Iterator[str]:
    """A tmpfs of ``size`` at ``path`` (root only; the test is skipped otherwise)."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def fill_disk(directory: str) -> str:
    """Write zeros into ``directory`` until the file system is full; return the file."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return path


def ask(pool: Pool, model: str, x: np.ndarray) -> Any:
    client = pool.client()
    try:
        return client.infer(model, x, timeout=10)
    finally:
        client.close()


def committed_version(state_dir: str, model: str) -> str:
    with open(os.path.join(state_dir, "models", f"{model}.json")) as f:
        return str(json.load(f)["current"]["version"])


@pytest.mark.slow
def test_full_or_read_only_state_dir_never_leaves_the_pool_inconsistent(tmp_path: object) -> None:
    d = str(tmp_path)
    v1 = make_mlp(os.path.join(d, "models", "m1.pt"), seed=4)
    v2 = make_mlp(os.path.join(d, "models", "m2.pt"), seed=5)
    fresh = make_mlp(os.path.join(d, "models", "n1.pt"), seed=6)
    x = mlp_input(1, seed=2)
    with small_tmpfs(os.path.join(d, "disk")) as disk:
        state = os.path.join(disk, "state")
        m = {"name": "m", "path": v1, "version": "1", "devices": ["cpu"]}
        with running_pool(os.path.join(d, "run1"), [m], state_dir=state) as pool:
            filler = fill_disk(disk)
            # An upgrade that cannot record its outcome does not switch, and says why.
            r = pool.pool_ctl("upgrade", "m", v2, "--version", "2")
            assert r.returncode == 1, r.stdout + r.stderr
            assert "state" in (r.stdout + r.stderr) and "not switching" in (r.stdout + r.stderr)
            assert pool.model("m")["version"] == "1"
            got = ask(pool, "m", x)
            assert got.version == "1"
            np.testing.assert_allclose(got.outputs[0], mlp_reference(4, x), rtol=1e-5, atol=1e-6)
            health = pool.pool_ctl("health")
            assert health.returncode == 1 and "state not saved" in health.stderr, health
        assert committed_version(state, "m") == "1"

        # A restart on the full disk, with a model it never ran: serves, says degraded.
        n = {"name": "n", "path": fresh, "devices": ["cpu"]}
        with running_pool(os.path.join(d, "run2"), [m, n], state_dir=state) as pool:
            assert pool.model("m")["version"] == "1"
            assert ask(pool, "n", x).outputs[0].shape == (1, 4)
            health = pool.pool_ctl("health")
            assert health.returncode == 1 and "state not saved" in health.stderr, health
            os.unlink(filler)  # room again: the state is written and health clears
            wait_for(lambda: pool.pool_ctl("health").returncode == 0, 30, "health to clear")
        assert os.path.exists(os.path.join(state, "models", "n.json"))

        # Read-only: the same.
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        with running_pool(os.path.join(d, "run3"), [m], state_dir=state) as pool:
            assert ask(pool, "m", x).version == "1"
            health = pool.pool_ctl("health")
            assert health.returncode == 1 and "state not saved" in health.stderr, health
            r = pool.pool_ctl("upgrade", "m", v2, "--version", "2")
            assert r.returncode == 1 and pool.model("m")["version"] == "1"


@pytest.mark.slow
def test_poold_never_chmods_a_directory_it_did_not_create(tmp_path: object) -> None:
    """A control socket in a shared 1777 directory is refused with a clear error, and
    the directory keeps its mode (poold used to chmod it to 0700)."""
    d = str(tmp_path)
    shared = os.path.join(d, "shared")
    os.makedirs(shared)
    os.chmod(shared, 0o1777)
    model = make_mlp(os.path.join(d, "m", "m.pt"), seed=4)
    pool = start_pool(
        d,
        [{"name": "m", "path": model, "devices": ["cpu"]}],
        wait=False,
        control=f"ipc://{shared}/gpu-pool.sock",
    )
    try:
        assert pool.proc.wait(60) == 1
    finally:
        pool.stop()
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
    assert "writable by others" in pool.log() and shared in pool.log()
    # A directory poold creates itself is owner-only.
    own = os.path.join(d, "own", "ctl")
    with running_pool(
        os.path.join(d, "ok"),
        [{"name": "m", "path": model, "devices": ["cpu"]}],
        control=f"ipc://{own}/c.sock",
    ):
        assert stat.S_IMODE(os.stat(own).st_mode) == 0o700
