"""``pool-ctl reload`` re-reads the CURVE authorized keys (issue 17): removing a client's
public key file revokes it for new connections, adding one admits it, no restart."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import zmq.auth
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import start_pool, wait_for

from pool.ctl.client import ControlClient, Unreachable
from router.client import Client
from router.errors import RequestTimeout

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_pair(base: Path, name: str) -> tuple[str, tuple[bytes, bytes]]:
    """(public key file, (public, secret)) made with zmq.auth."""
    (base / name).mkdir(parents=True)
    public_file, secret_file = zmq.auth.create_certificates(str(base / name), name)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    return public_file, (public, secret)


def test_reload_revokes_a_removed_key_and_admits_an_added_one(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    server_public, (server_key, _) = key_pair(keys, "server")
    old_file, old = key_pair(keys, "old")
    new_file, new = key_pair(keys, "new")
    admin_file, admin = key_pair(keys, "admin")  # pool-ctl's (the control socket has CURVE)
    authorized = keys / "authorized"
    authorized.mkdir()
    shutil.copy(old_file, authorized / "old.key")
    shutil.copy(admin_file, authorized / "admin.key")
    path = make_mlp(str(tmp_path / "models" / "mlp.pt"), seed=3)
    port = free_port()
    front = f"tcp://127.0.0.1:{port}"
    models = [{"name": "mlp", "path": path, "devices": ["cpu"]}]
    pool = start_pool(
        str(tmp_path),
        models,
        wait=False,
        frontend=front,
        curve_secret_key=str(keys / "server" / "server.key_secret"),
        curve_authorized_keys=str(authorized),
    )
    ctl = ControlClient(pool.control, server_key=server_key, client_keys=admin)

    def serving() -> bool:
        assert pool.proc.poll() is None, pool.log()
        try:
            models = ctl.call("status")["data"]["models"]
        except Unreachable:
            return False
        return all(m["status"] == "serving" and m["workers"] for m in models)

    try:
        wait_for(serving, 60, "the CURVE pool to serve")

        def served(client_keys: tuple[bytes, bytes]) -> bool:
            c = Client(
                front, retries=0, timeout=2.0, curve_server_key=server_key, curve_keys=client_keys
            )
            with c:
                try:
                    x = mlp_input(1)
                    out = c.infer("mlp", x).outputs[0]
                except RequestTimeout:
                    return False
            np.testing.assert_allclose(out, mlp_reference(3, x), rtol=1e-5, atol=1e-6)
            return True

        assert served(old) and not served(new)
        (authorized / "old.key").unlink()
        shutil.copy(new_file, authorized / "new.key")
        done = pool.pool_ctl(
            "--curve-server-key",
            server_public,
            "--curve-client-key",
            str(keys / "admin" / "admin.key_secret"),
            "reload",
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "1 added, 1 removed" in done.stdout, done.stdout
        assert served(new) and not served(old)
        assert pool.proc.poll() is None
    finally:
        pool.stop()
