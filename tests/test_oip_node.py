"""The OIP/HTTP gateway from a client in another language: Node.js's own fetch (undici),
written from docs/PROTOCOL.md alone (tests/clients/oip_http_client.mjs): health,
metadata, a two-input two-output model with binary tensors and with JSON, 32 requests
at once over keep-alive, and an unknown model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from modelkit import make_two_input
from oipkit import free_ports
from poolkit import running_pool, wait_for

NODE = shutil.which("node")
CLIENT = os.path.join(os.path.dirname(__file__), "clients", "oip_http_client.mjs")


def _ready(at: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{at}/v2/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(NODE is None, reason="needs Node.js 18 or newer (apt-get install nodejs)")
def test_a_nodejs_fetch_client_gets_exact_answers(tmp_path: Path) -> None:
    assert NODE is not None
    d = str(tmp_path)
    (http,) = free_ports(1)
    at = f"127.0.0.1:{http}"
    models = [{"name": "two", "path": make_two_input(f"{d}/m/two.pt"), "version": "7",
               "devices": ["cpu"], "threads": 1}]  # fmt: skip
    with running_pool(d, models, http=at, oip_processes=1):
        wait_for(lambda: _ready(at), 30, "the HTTP gateway ready")
        out = subprocess.run([NODE, CLIENT, at, "two"], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    b = [0.5, -1, 2, 0, 10, -3, 0.25, 4]
    plus = [x + y for x, y in zip(a, b, strict=True)]
    times = [x * y for x, y in zip(a, b, strict=True)]
    assert got["ready"] == 200 and got["metaStatus"] == 200
    assert got["names"] == ["a", "b"]  # from forward(a, b)
    assert got["outputs"] == [["output0", "FP32"], ["output1", "FP32"]]
    assert got["binary"] == {"status": 200, "version": "7",
                             "out": {"output0": plus, "output1": times}}  # fmt: skip
    assert got["json"]["status"] == 200 and got["json"]["version"] == "7"
    assert got["json"]["outputs"] == [["output0", "FP32", [2, 4], plus],
                                      ["output1", "FP32", [2, 4], times]]  # fmt: skip
    assert got["many"] == [1 + i + 0.5 for i in range(32)]  # each its own answer, in order
    assert got["missing"]["status"] == 404
    assert "no-such-model" in got["missing"]["body"]["error"]
