"""The classic in-process swap, for comparison: a child server process that swaps its
model in place while its own threads call it (started as ``python stresskit.py inproc
DEVICE CLIENTS DIR``), and the driver's handle on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
from stress_models import VERSIONS, output_problem
from stress_samples import percentile

STRESSKIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stresskit.py")


class InProcess:
    """The classic way, for comparison: one long-lived server process that swaps its
    model in place (``to("cpu")``, ``del``, ``gc.collect()``, ``empty_cache()``) while
    its own client threads call it. Commands go over stdin, answers come back as JSON
    lines on stdout."""

    def __init__(self, device: str, clients: int, refs_dir: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, STRESSKIT, "inproc", device, str(clients),
             refs_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        self.pid = self.proc.pid

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process server exited ({self.proc.wait()})")
        return dict(json.loads(line))

    def stop(self) -> None:
        try:
            self.call("quit")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def inproc_server(device: str, clients: int, refs_dir: str) -> None:
    """Child process: serve from threads, swap the model in place on command."""
    import gc
    import threading

    import torch

    refs = np.load(os.path.join(refs_dir, "refs.npz"))
    expect = {v: refs[f"out{v}"] for v in VERSIONS}
    dev = torch.device(device)
    x = torch.from_numpy(refs["x"]).to(dev)
    cond = threading.Condition()
    state: dict[str, Any] = {"model": None, "version": "", "inflight": 0, "stop": False}
    lat: list[float] = []
    failures: list[str] = []

    def client() -> None:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # make the context current in this thread too
        while True:
            t0 = time.perf_counter()
            with cond:
                while state["model"] is None and not state["stop"]:
                    cond.wait(0.1)
                if state["stop"]:
                    return
                model, version = state["model"], state["version"]
                state["inflight"] += 1
            try:
                with torch.inference_mode():
                    out = model(x).cpu().numpy()
                problem = output_problem(expect, version, out)
            except Exception as exc:  # a failed request is counted, never fatal
                problem = f"{type(exc).__name__}: {exc}"
            finally:
                model = None  # drop the reference, or an old copy outlives its swap
                with cond:
                    state["inflight"] -= 1
                    cond.notify_all()
            with cond:
                lat.append(time.perf_counter() - t0)
                if problem:
                    failures.append(problem)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for line in sys.stdin:
        msg = json.loads(line)
        cmd, reply = msg.get("cmd"), dict[str, Any](ok=True)
        t0 = time.perf_counter()
        if cmd == "load":
            model = torch.jit.load(msg["path"], map_location=dev).eval()
            with torch.inference_mode():
                model(x)
            sync()
            with cond:
                state["model"], state["version"] = model, msg["version"]
                cond.notify_all()
            del model
            reply["load_s"] = time.perf_counter() - t0
        elif cmd == "unload":
            with cond:
                old, state["model"] = state["model"], None
                while state["inflight"]:
                    cond.wait()
            if old is not None:  # the classic swap: everything one is told to do
                old.to("cpu")
                del old
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            sync()
            reply["unload_s"] = time.perf_counter() - t0
        elif cmd == "stats":
            with cond:
                done, lat[:] = list(lat), []
                failed, failures[:] = list(failures), []
            ms = [round(d * 1e3, 3) for d in done]
            reply.update(requests=len(ms), failed=len(failed), errors=failed[:5],
                         latencies_ms=ms, p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99))
        elif cmd == "quit":
            break
        print(json.dumps(reply), flush=True)
    with cond:
        state["stop"] = True
        cond.notify_all()
    for t in threads:
        t.join(30)
