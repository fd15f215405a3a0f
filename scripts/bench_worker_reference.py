"""The in-process reference for ``scripts/bench_worker_host.py``: the same model called at
batch ``--max-batch`` in a child process (rows/s), for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# The file whose hidden --worker / --reference-role options start the children.
BENCH_WORKER_HOST = os.path.join(HERE, "bench_worker_host.py")


def reference_main(cfg_json: str) -> int:
    """Child process: the same model called in-process at one batch size (images/s)."""
    import torch

    from workers.loader import load_model
    from workers.warmup import TORCH_DTYPES

    cfg = json.loads(cfg_json)
    dev = torch.device(cfg["device"])
    model = load_model(cfg["path"], dev)
    x = torch.ones(cfg["batch"], *cfg["shape"][1:], dtype=TORCH_DTYPES[cfg["dtype"]], device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(5):
        model.forward([x])
    sync()
    n, t0 = 0, time.monotonic()
    while True:
        model.forward([x])
        n += 1
        if n % 5 == 0:
            sync()
            if time.monotonic() - t0 >= cfg["seconds"]:
                break
    dt = time.monotonic() - t0
    print(json.dumps({"images_per_s": n * cfg["batch"] / dt, "ms_per_batch": dt / n * 1e3}))
    return 0


def reference(a: argparse.Namespace, path: str, shape: list[int], env: dict[str, str]) -> Any:
    cfg = {"device": a.device, "path": path, "shape": shape, "dtype": a.dtype,
           "batch": a.max_batch, "seconds": a.reference_s}  # fmt: skip
    cmd = [sys.executable, BENCH_WORKER_HOST, "--reference-role", json.dumps(cfg)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise SystemExit(f"in-process reference failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
