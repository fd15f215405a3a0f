"""A model is code (issue 17): a TorchScript model with no pickle in it reads a file
through ``torch.from_file`` and returns its bytes. Under the worker sandbox
(workers.sandbox) it gets MODEL_ERROR instead, and the pool goes on serving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from modelkit import make_mlp, mlp_input
from poolkit import running_pool

from router.client import Client
from router.errors import PoolError
from workers import landlock

ABI, WHY = landlock.abi_version()
SECRET = b"gpu-pool secret: no model may read this"


class _Reader(torch.nn.Module):
    """Doubles its input; an input whose first value is 7 gets the file instead."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path: torch.jit.Final[str] = path  # a constant in the saved program
        self.size: torch.jit.Final[int] = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x[0, 0] == 7.0):
            data = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
            return data.to(torch.float32).reshape(1, self.size)
        return x * 2


def make_reader(model_dir: Path, target: Path) -> str:
    model_dir.mkdir(parents=True)
    path = str(model_dir / "reader.pt")
    torch.jit.script(_Reader(str(target), len(SECRET))).save(path)
    return path


def setup(tmp_path: Path) -> tuple[list[dict[str, object]], Path]:
    secret = tmp_path / "secret.txt"  # beside the model roots, not in one
    secret.write_bytes(SECRET)
    reader = make_reader(tmp_path / "models" / "reader", secret)
    mlp_dir = tmp_path / "models" / "mlp"
    mlp_dir.mkdir()
    mlp = make_mlp(str(mlp_dir / "model.pt"), seed=3)
    models: list[dict[str, object]] = [
        {"name": "reader", "path": reader, "version": "1", "devices": ["cpu"]},
        {"name": "mlp", "path": mlp, "version": "1", "devices": ["cpu"]},
    ]
    return models, secret


def steal(c: Client) -> bytes:
    trigger = np.full((1, len(SECRET)), 7.0, np.float32)
    out = c.infer("reader", trigger).outputs[0]
    return bytes(out.astype(np.uint8).ravel().tolist())


@pytest.mark.slow
@pytest.mark.skipif(ABI < 1, reason=WHY or "no Landlock")
def test_a_model_cannot_read_outside_its_root(tmp_path: Path) -> None:
    models, _ = setup(tmp_path)
    with running_pool(str(tmp_path), models) as pool:
        with Client(pool.frontend, retries=0, timeout=20) as c:
            with pytest.raises(PoolError) as err:
                steal(c)
            assert err.value.code == "MODEL_ERROR"
            assert SECRET.decode() not in err.value.message
            assert "Permission denied" in err.value.message or "EACCES" in err.value.message
            # The same worker goes on serving what its model may do, and so does the pool.
            x = np.ones((1, 4), np.float32)
            np.testing.assert_array_equal(c.infer("reader", x).outputs[0], x * 2)
            assert c.infer("mlp", mlp_input(2)).outputs[0].shape == (2, 4)
        for model in ("reader", "mlp"):
            workers = pool.model(model)["workers"]
            assert workers and all(w["sandbox"]["applied"] for w in workers), workers
            # Its links to poold survived: the lane (a unix socket connected from inside
            # the sandbox) as well as the backend socket.
            assert all(w["lane"] for w in workers), workers
            report = workers[0]["sandbox"]
            assert report["fs"] and report["landlock_abi"] == ABI and report["mode"] == "auto"
            assert report["net"] == ("denied" if report["seccomp"] else "tcp-denied")
        text = pool.pool_ctl("status").stdout
        assert text.count(f"landlock {ABI}") == 2, text


@pytest.mark.slow
def test_without_the_sandbox_the_model_gets_the_file(tmp_path: Path) -> None:
    """The attack works when the sandbox is off (so the test above can fail)."""
    models, _ = setup(tmp_path)
    models[0]["sandbox"] = False  # per model; the pool's default stays "auto"
    with running_pool(str(tmp_path), models) as pool:
        with Client(pool.frontend, retries=0, timeout=20) as c:
            assert steal(c) == SECRET
        reader = pool.model("reader")["workers"][0]["sandbox"]
        assert reader["applied"] is False and reader["mode"] == "false"
        assert " off" in pool.pool_ctl("status").stdout
        mlp = pool.model("mlp")["workers"][0]["sandbox"]
        assert mlp["mode"] == "auto" and mlp["applied"] == (ABI >= 1 or mlp["seccomp"])
