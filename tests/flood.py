"""Flood a pool from one DEALER socket with many requests in flight; print code counts.

usage: flood.py ENDPOINT MODEL SECONDS   (answers are checked against modelkit's MLP seed 4)
"""

from __future__ import annotations

import sys
import time

import msgpack
import numpy as np
import zmq
from modelkit import mlp_input, mlp_reference

IN_FLIGHT = 256


def main() -> int:
    endpoint, model, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    x = mlp_input(1, seed=9)
    want = mlp_reference(4, x)
    header = msgpack.packb(
        {"model": model, "inputs": [{"dtype": "float32", "shape": [1, 16]}], "timeout_ms": 500}
    )
    counts: dict[str, int] = {}
    pending = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end or pending:
        while pending < IN_FLIGHT and time.monotonic() < end:
            sock.send_multipart([b"", b"gpu-pool/1", header, x.tobytes()])
            pending += 1
        if not sock.poll(5000):
            counts["LOST"] = counts.get("LOST", 0) + pending
            break
        while sock.poll(0):
            frames = sock.recv_multipart()
            pending -= 1
            reply = msgpack.unpackb(frames[2])
            if reply["ok"]:
                out = reply["outputs"][0]
                got = np.frombuffer(out["data"], np.float32).reshape(out["shape"])
                code = "OK" if np.allclose(got, want, rtol=1e-5, atol=1e-6) else "WRONG"
            else:
                code = reply["error"]["code"]
            counts[code] = counts.get(code, 0) + 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
