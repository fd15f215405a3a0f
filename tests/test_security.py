"""A closed door (issue 4): no public endpoint without CURVE, CURVE lets in only authorised
keys, upgrades load only from the model roots, the control socket is owner-only, and no
pickle anywhere near the wire.

The CURVE pool binds 0.0.0.0 (that is the point of CURVE) but the tests only ever connect
to 127.0.0.1.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.auth
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import Pool, running_pool, start_pool, wait_for, write_config

from pool.ctl.client import ControlClient, Unreachable
from router.client import Client
from router.errors import RequestTimeout

ROOT = Path(__file__).resolve().parent.parent
SEED = 7
VERSION = "7"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def assert_mlp_answer(client: Client) -> None:
    x = mlp_input(3, seed=42)
    r = client.infer("mlp", x)
    assert r.version == VERSION
    np.testing.assert_allclose(r.outputs[0], mlp_reference(SEED, x), rtol=1e-5, atol=1e-6)


# ================================================= (a) no public endpoint without CURVE
def run_poold(config: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pool.poold", "--config", config],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def model_path(tmp_path: Path) -> str:
    # The daemon refuses before loading anything: any existing file will do as the model.
    path = tmp_path / "models" / "mlp.pt"
    path.parent.mkdir()
    path.write_bytes(b"not loaded")
    return str(path)


def base_pool(tmp: Path) -> dict[str, Any]:
    return {
        "frontend": f"ipc://{tmp}/front.sock",
        "control": f"ipc://{tmp}/ctl.sock",
        "state_dir": str(tmp / "state"),
        "metrics": "",
    }


@pytest.mark.slow
@pytest.mark.parametrize("key", ["frontend", "control"])
@pytest.mark.parametrize("host", ["0.0.0.0", "*", "[::]", "192.0.2.7", "[::ffff:10.0.0.1]"])
def test_public_tcp_endpoint_without_curve_is_refused(
    tmp_path: Path, model_path: str, key: str, host: str
) -> None:
    endpoint = f"tcp://{host}:{free_port()}"
    config = write_config(
        str(tmp_path / "pool.toml"),
        {**base_pool(tmp_path), key: endpoint},
        [{"name": "mlp", "path": model_path, "devices": ["cpu"]}],
    )
    done = run_poold(config)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"pool.{key}: refusing to listen on a non-loopback address without CURVE" in (
        done.stderr
    ), done.stderr
    assert "curve_secret_key" in done.stderr and "curve_authorized_keys" in done.stderr
    assert not (tmp_path / "state").exists(), "poold must refuse before touching anything"


def test_public_tcp_from_the_environment_is_refused(tmp_path: Path, model_path: str) -> None:
    config = write_config(
        str(tmp_path / "pool.toml"),
        base_pool(tmp_path),
        [{"name": "mlp", "path": model_path, "devices": ["cpu"]}],
    )
    done = run_poold(config, {"GPU_POOL_FRONTEND": f"tcp://0.0.0.0:{free_port()}"})
    assert done.returncode == 2, done.stderr
    assert "env GPU_POOL_FRONTEND: refusing to listen on a non-loopback address" in done.stderr


def test_half_a_curve_configuration_is_refused(tmp_path: Path, model_path: str) -> None:
    _, secret = zmq.auth.create_certificates(str(tmp_path), "server")
    pool = {
        **base_pool(tmp_path),
        "frontend": f"tcp://0.0.0.0:{free_port()}",
        "curve_secret_key": secret,
    }
    config = write_config(
        str(tmp_path / "pool.toml"), pool, [{"name": "mlp", "path": model_path, "devices": ["cpu"]}]
    )
    done = run_poold(config)
    assert done.returncode == 2, done.stderr
    assert "pool.curve_secret_key: must be set together with pool.curve_authorized_keys" in (
        done.stderr
    )


# ================================================================ (b) CURVE lets in only
@dataclass
class Keys:
    server_public: bytes
    client: tuple[bytes, bytes]  # (public, secret), authorised
    stranger: tuple[bytes, bytes]  # (public, secret), unknown to the server
    impostor_server: bytes  # a server public key that is not poold's


@dataclass
class CurvePool:
    pool: Pool
    frontend: str  # what clients connect to: 127.0.0.1
    control: str
    keys: Keys

    def ctl(
        self, keys: tuple[bytes, bytes] | None, server: bytes | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        client = ControlClient(
            self.control,
            connect_timeout_s=timeout,
            server_key=server or self.keys.server_public,
            client_keys=keys,
        )
        return client.call("status")

    def client(
        self, keys: tuple[bytes, bytes] | None, server: bytes | None = None, timeout: float = 10.0
    ) -> Client:
        return Client(
            self.frontend,
            retries=1,
            timeout=timeout,
            curve_server_key=server or self.keys.server_public,
            curve_keys=keys,
        )


def make_keys(base: Path) -> tuple[Keys, str, str]:
    """Server, authorised client, stranger and impostor key pairs, made with zmq.auth; the
    authorised directory holds only the authorised client's public key."""
    made = {}
    for name in ("server", "client", "stranger", "impostor"):
        folder = base / name
        folder.mkdir(parents=True)
        made[name] = zmq.auth.create_certificates(str(folder), name)
    authorized = base / "authorized"
    authorized.mkdir()
    shutil.copy(made["client"][0], authorized / "client.key")

    def pair(name: str) -> tuple[bytes, bytes]:
        public, secret = zmq.auth.load_certificate(made[name][1])
        assert secret is not None
        return public, secret

    keys = Keys(pair("server")[0], pair("client"), pair("stranger"), pair("impostor")[0])
    return keys, made["server"][1], str(authorized)


@pytest.fixture(scope="module")
def curve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CurvePool]:
    d = tmp_path_factory.mktemp("curve")
    keys, server_secret, authorized = make_keys(d / "keys")
    path = make_mlp(str(d / "models" / "mlp.pt"), seed=SEED)
    front_port, ctl_port, http_port = free_port(), free_port(), free_port()
    pool = start_pool(
        str(d),
        [{"name": "mlp", "path": path, "version": VERSION, "devices": ["cpu"]}],
        wait=False,
        frontend=f"tcp://0.0.0.0:{front_port}",
        control=f"tcp://0.0.0.0:{ctl_port}",
        curve_secret_key=server_secret,
        curve_authorized_keys=authorized,
        # An OIP gateway beside CURVE: poold admits the gateway's own key for the run,
        # and the tests below prove that this lets no other key in.
        http=f"127.0.0.1:{http_port}",
    )
    pool.env["OIP_HTTP"] = f"127.0.0.1:{http_port}"
    cp = CurvePool(pool, f"tcp://127.0.0.1:{front_port}", f"tcp://127.0.0.1:{ctl_port}", keys)
    try:

        def serving() -> bool:
            assert pool.proc.poll() is None, f"poold exited:\n{pool.log()}"
            try:
                models = cp.ctl(keys.client, timeout=1.0)["data"]["models"]
            except Unreachable:
                return False
            return all(m["status"] == "serving" and m["workers"] for m in models)

        wait_for(serving, 90, "the CURVE pool to serve")
        yield cp
    finally:
        pool.stop()
        try:
            os.killpg(pool.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_curve_authorised_client_is_served(curve: CurvePool) -> None:
    with curve.client(curve.keys.client) as c:
        for _ in range(3):
            assert_mlp_answer(c)


@pytest.mark.slow
@pytest.mark.parametrize("who", ["stranger", "no-curve", "impostor-server"])
def test_curve_others_are_not_served(curve: CurvePool, who: str) -> None:
    """An unknown key, a client without CURVE, and an authorised client that expects a
    different server key (it must not talk to an impostor) all get no reply at all."""
    if who == "stranger":
        client = curve.client(curve.keys.stranger, timeout=2.0)
    elif who == "no-curve":
        client = Client(curve.frontend, retries=1, timeout=2.0)
    else:
        client = curve.client(curve.keys.client, server=curve.keys.impostor_server, timeout=2.0)
    with client, pytest.raises(RequestTimeout):
        client.infer("mlp", mlp_input(1))
    with curve.client(curve.keys.client) as c:  # and the door still opens for the right key
        assert_mlp_answer(c)
    assert curve.pool.proc.poll() is None


def test_curve_pool_serves_the_open_inference_protocol(curve: CurvePool) -> None:
    """The gateway reaches a CURVE frontend and control socket with its run key."""
    import tritonclient.http as thttp

    with thttp.InferenceServerClient(curve.pool.env["OIP_HTTP"]) as c:
        wait_for(lambda: _ready(c), 30, "the OIP gateway of the CURVE pool")
        x = mlp_input(2)
        inp = thttp.InferInput("input0", [2, 16], "FP32")
        meta = c.get_model_metadata("mlp")
        if meta["inputs"]:
            inp = thttp.InferInput(meta["inputs"][0]["name"], [2, 16], "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer("mlp", [inp])
        assert r.get_response()["model_version"] == VERSION
        np.testing.assert_allclose(
            r.as_numpy("output0"), mlp_reference(SEED, x), rtol=1e-5, atol=1e-6
        )


def _ready(c: Any) -> bool:
    try:
        return bool(c.is_server_ready())
    except Exception:
        return False


@pytest.mark.slow
def test_curve_control_serves_only_the_authorised_key(curve: CurvePool) -> None:
    status = curve.ctl(curve.keys.client)
    assert status["ok"] is True and status["data"]["models"][0]["name"] == "mlp"
    with pytest.raises(Unreachable):
        curve.ctl(curve.keys.stranger, timeout=2.0)
    with pytest.raises(Unreachable):
        ControlClient(curve.control, connect_timeout_s=2.0).call("status")
    with pytest.raises(Unreachable):
        curve.ctl(curve.keys.client, server=curve.keys.impostor_server, timeout=2.0)
    assert curve.ctl(curve.keys.client)["ok"] is True


@pytest.mark.slow
def test_curve_control_ignores_a_plain_raw_socket(curve: CurvePool) -> None:
    """Without the handshake, even a well-formed control message reaches nobody."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(curve.control)
        sock.send_multipart([b"", b"gpu-pool-ctl/1", b"\x82\xa3cmd\xa6status\xa4args\x80"])
        assert not sock.poll(1500)
    finally:
        sock.close(linger=0)
    assert curve.pool.proc.poll() is None


# =================================== (c) model roots and (d) an owner-only control socket
@dataclass
class Rooted:
    pool: Pool
    root: Path
    outside: Path
    run_dir: Path
    pids: set[int]


@pytest.fixture(scope="module")
def rooted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rooted]:
    d = tmp_path_factory.mktemp("roots")
    root, outside = d / "models", d / "outside"
    path = make_mlp(str(root / "mlp.pt"), seed=SEED)
    make_mlp(str(outside / "evil.pt"), seed=8)
    make_mlp(str(root / "v8.pt"), seed=8)
    (root / "link.pt").symlink_to(outside / "evil.pt")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    run_dir = d / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o755)  # as an admin might have left it: poold must not change it
    models = [{"name": "mlp", "path": path, "version": VERSION, "devices": ["cpu"]}]
    with running_pool(
        str(d), models, control=f"ipc://{run_dir}/ctl.sock", model_roots=[str(root)]
    ) as pool:
        pids = {w["pid"] for w in pool.model("mlp")["workers"]}
        yield Rooted(pool, root, outside, run_dir, pids)


def upgrade_refused(r: Rooted, path: str) -> str:
    done = r.pool.pool_ctl("upgrade", "mlp", path, "--version", "evil", timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 1, (done.returncode, out)
    return " ".join(out.split())  # rich wraps long lines


def assert_untouched(r: Rooted) -> None:
    m = r.pool.model("mlp")
    assert m["version"] == VERSION and m["status"] == "serving", m
    assert {w["pid"] for w in m["workers"]} == r.pids, "no worker may have been started"
    history = r.pool.ctl("history", {"model": "mlp"})["data"]["history"]
    assert all(h.get("version") != "evil" for h in history), history
    with r.pool.client(retries=1, timeout=10) as c:
        assert_mlp_answer(c)


@pytest.mark.slow
def test_upgrade_from_outside_the_roots_is_refused(rooted: Rooted) -> None:
    evil = str(rooted.outside / "evil.pt")
    out = upgrade_refused(rooted, evil)
    assert f"{evil} is outside the allowed model roots: {rooted.root}" in out, out
    assert_untouched(rooted)


@pytest.mark.parametrize("via", ["link.pt", "linkdir/evil.pt", "../outside/evil.pt"])
def test_upgrade_through_a_symlink_or_dotdot_out_of_the_roots_is_refused(
    rooted: Rooted, via: str
) -> None:
    out = upgrade_refused(rooted, f"{rooted.root}/{via}")
    assert "outside the allowed model roots" in out, out
    if via != "../outside/evil.pt":  # pool-ctl makes the path absolute, which folds ".."
        assert f"resolves to {rooted.outside / 'evil.pt'}" in out, out
    assert_untouched(rooted)


@pytest.mark.parametrize("path", ["/etc/passwd", "/proc/self/environ", "/"])
def test_upgrade_from_system_files_is_refused(rooted: Rooted, path: str) -> None:
    assert "outside the allowed model roots" in upgrade_refused(rooted, path)
    assert_untouched(rooted)


def test_control_socket_is_owner_only(rooted: Rooted) -> None:
    # A directory poold did not create keeps its mode (a shared /tmp must keep its
    # sticky bit); the socket's own 0600 mode is what keeps other users out.
    dir_mode = stat.S_IMODE(os.stat(rooted.run_dir).st_mode)
    assert dir_mode == 0o755, oct(dir_mode)
    st = os.stat(rooted.run_dir / "ctl.sock")
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(stat.S_IMODE(st.st_mode))
    assert st.st_uid == os.getuid()
    state_mode = stat.S_IMODE(os.stat(Path(rooted.pool.dir) / "state").st_mode)
    assert state_mode == 0o700, oct(state_mode)


@pytest.mark.slow
def test_upgrade_from_inside_the_roots_still_works(rooted: Rooted) -> None:
    """The positive control for the refusals above (runs last: it changes the version)."""
    done = rooted.pool.pool_ctl(
        "upgrade", "mlp", str(rooted.root / "v8.pt"), "--version", "8", timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert rooted.pool.model("mlp")["version"] == "8"


# ========================================================= (e) no pickle near the wire
PACKAGES = ("pool", "router", "workers", "gateway")
PICKLE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}
FORBIDDEN_NAMES = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized"}


def sources() -> list[Path]:
    files = sorted(f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 20, files
    return files


def pickle_problems(text: str, rel: str) -> list[str]:
    """Pickle modules, pyobj/serialized socket calls, weights_only not True, allow_pickle
    not False: found in the code itself (comments and docstrings may name them)."""
    problems = []
    for node in ast.walk(ast.parse(text, rel)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        problems += [
            f"{rel}:{node.lineno}: uses {name}"
            for name in names
            if name in PICKLE_MODULES or name in FORBIDDEN_NAMES
        ]
        if isinstance(node, ast.keyword) and node.arg in ("weights_only", "allow_pickle"):
            want = node.arg == "weights_only"
            if not (isinstance(node.value, ast.Constant) and node.value.value is want):
                problems.append(f"{rel}:{node.value.lineno}: {node.arg} is not {want}")
    code = code_only(text)
    for pattern in GREP_PATTERNS:  # the grep, as a second net
        if re.search(pattern, code):
            problems.append(f"{rel}: matches {pattern!r}")
    return problems


GREP_PATTERNS = (
    r"\bpickle\b",
    r"\brecv_pyobj\b",
    r"\bsend_pyobj\b",
    r"\bweights_only\s*=\s*False\b",
)


def code_only(text: str) -> str:
    """The source without comments and string literals (docstrings may say what is
    refused, e.g. the loader explains when torch.export.load would use pickle)."""
    toks = tokenize.generate_tokens(io.StringIO(text).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.COMMENT, tokenize.STRING))


def torch_load_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and isinstance(func.value, ast.Name)
                and func.value.id == "torch"
            ):
                yield node


def torch_load_problems(text: str, rel: str) -> tuple[list[str], int]:
    """(problems, number of torch.load calls): each call must pass weights_only=True."""
    tree = ast.parse(text, rel)
    problems, calls = [], list(torch_load_calls(tree))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "torch"
            and any(a.name == "load" for a in node.names)
        ):
            problems.append(f"{rel}:{node.lineno}: 'from torch import load' hides the call")
    for call in calls:
        value = {k.arg: k.value for k in call.keywords}.get("weights_only")
        if not (isinstance(value, ast.Constant) and value.value is True):
            problems.append(f"{rel}:{call.lineno}: torch.load without weights_only=True")
    if text.count("torch.load(") != len(calls):  # a call the AST walk did not recognise
        problems.append(
            f"{rel}: torch.load( appears {text.count('torch.load(')} times, "
            f"{len(calls)} recognised calls"
        )
    return problems, len(calls)


@pytest.mark.slow
def test_no_pickle_in_the_packages() -> None:
    problems = [
        p for f in sources() for p in pickle_problems(f.read_text(), str(f.relative_to(ROOT)))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_torch_load_passes_weights_only_true() -> None:
    problems, seen = [], 0
    for f in sources():
        found, n = torch_load_problems(f.read_text(), str(f.relative_to(ROOT)))
        problems += found
        seen += n
    assert not problems, "\n".join(problems)
    assert seen >= 1, "expected to find the .pt2 safety check's torch.load call"


def test_the_source_checks_catch_what_they_look_for() -> None:
    bad = (
        "import pickle\nimport torch\nfrom dill import loads\nsock.recv_pyobj()\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
    )
    found = pickle_problems(bad, "bad.py")
    for what in (
        "uses pickle",
        "uses dill",
        "uses recv_pyobj",
        "weights_only is not True",
        "allow_pickle is not False",
    ):
        assert any(what in p for p in found), (what, found)
    assert any("matches" in p and "weights_only" in p for p in found), found  # the grep
    problems, n = torch_load_problems(bad, "bad.py")
    assert n == 2 and len(problems) == 2, problems
    good = (
        'import torch\n# pickle is refused\n"""no weights_only=False"""\n'
        "torch.load(f, weights_only=True)\n"
    )
    assert pickle_problems(good, "good.py") == []
    assert torch_load_problems(good, "good.py") == ([], 1)


@pytest.mark.slow
def test_pool_ctl_reaches_a_curve_control_endpoint_with_key_files(curve: CurvePool) -> None:
    keys = os.path.join(curve.pool.dir, "keys")
    base = ["--control", curve.control, "--connect-timeout", "2"]
    server = ["--curve-server-key", os.path.join(keys, "server", "server.key")]
    ok = curve.pool.pool_ctl(
        *base,
        *server,
        "--curve-client-key",
        os.path.join(keys, "client", "client.key_secret"),
        "status",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    stranger = curve.pool.pool_ctl(
        *base,
        *server,
        "--curve-client-key",
        os.path.join(keys, "stranger", "stranger.key_secret"),
        "status",
    )
    assert stranger.returncode == 3
    half = curve.pool.pool_ctl(*base, *server, "status")
    assert half.returncode == 2 and "go together" in half.stderr
