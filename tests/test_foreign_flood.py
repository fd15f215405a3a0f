"""A hostile client in another language, written from the ZMTP 3.0 spec and PROTOCOL.md
alone (``tests/clients/zmtp_flood.mjs``, Node.js, no libzmq): six connections flood
``[256, 16]`` requests and never read a byte. The byte bounds of issue 17 hold for it as
for a pyzmq DEALER: poold stays bounded, gives the memory back when it leaves, and the
well-behaved client on the same model is answered throughout."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import psutil
import pytest
from modelkit import make_mlp, mlp_input, mlp_reference
from poolkit import running_pool, wait_for

from router.client import Client
from router.errors import PoolError

NODE = shutil.which("node")
FLOOD = os.path.join(os.path.dirname(__file__), "clients", "zmtp_flood.mjs")
MiB = 1 << 20
CAP_MB, TOTAL_MB, CONNECTIONS = 8, 24, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(NODE is None, reason="needs Node.js (apt-get install nodejs)")
def test_a_foreign_client_flooding_six_connections_is_bounded(tmp_path: object) -> None:
    assert NODE is not None
    d = str(tmp_path)
    model = make_mlp(os.path.join(d, "m", "m.pt"), seed=4, out_features=16)
    port = free_port()
    with running_pool(
        d,
        [{"name": "m", "path": model, "devices": ["cpu"], "max_queue": 256, "threads": 1}],
        frontend=f"tcp://127.0.0.1:{port}",
        max_unread_reply_mb=CAP_MB,
        max_unread_reply_total_mb=TOTAL_MB,
    ) as pool:
        endpoint = f"tcp://127.0.0.1:{port}"
        x = mlp_input(1, seed=3)
        want = mlp_reference(4, x, out_features=16)
        with Client(endpoint, timeout=10) as c:
            for _ in range(20):
                c.infer("m", x)

        def rss() -> int:
            return int(psutil.Process(pool.proc.pid).memory_info().rss)

        base = peak = rss()
        flood = subprocess.Popen(
            [NODE, FLOOD, "127.0.0.1", str(port), str(CONNECTIONS), "m"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        codes: dict[str, int] = {}
        latencies: list[float] = []
        try:
            time.sleep(1)  # the flood is on before the other client starts
            with Client(endpoint, timeout=10, retries=0) as c:
                end = time.monotonic() + 8
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    try:
                        r = c.infer("m", x)
                        ok = np.allclose(r.outputs[0], want, rtol=1e-5, atol=1e-6)
                        code = "OK" if ok else "WRONG"
                    except PoolError as exc:
                        code = exc.code
                    latencies.append(time.perf_counter() - t0)
                    codes[code] = codes.get(code, 0) + 1
                    peak = max(peak, rss())
        finally:
            flood.terminate()  # SIGTERM: it prints its count once more on the way out
            output = flood.communicate(timeout=10)[0]
        assert flood.returncode is not None and pool.proc.poll() is None
        lines = [ln for ln in output.splitlines() if ln.startswith("{")]
        assert lines, output[-2000:]
        sent = int(json.loads(lines[-1])["sent"])
        # It sent many times the total bound (each request and reply is 16 KiB) ...
        assert sent * 16 * 1024 > 4 * TOTAL_MB * MiB, (sent, output[-500:])
        # ... poold grew by a bounded amount, and the other client was served throughout.
        over = (peak - base) / MiB
        assert over < 4 * TOTAL_MB + 32, f"poold grew {over:.0f} MiB (bound {TOTAL_MB} MiB)"
        assert codes.get("OK", 0) >= 20 and set(codes) == {"OK"}, codes
        latencies.sort()
        assert latencies[int(len(latencies) * 0.99)] < 1.0, latencies[-5:]
        # Once it has gone, poold gives the memory back (the allocator trim runs every 5 s).
        wait_for(lambda: rss() < base + 16 * MiB, 20, "RSS back near its start")
        print(
            f"foreign flood: {sent} requests on {CONNECTIONS} connections; poold "
            f"+{over:.1f} MiB at most, +{(rss() - base) / MiB:.1f} MiB after; the other "
            f"client {codes}, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms"
        )
