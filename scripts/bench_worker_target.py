"""The worker under test in ``scripts/bench_worker_host.py``: its model (a tiny scripted
one, or resnet50), and the worker process itself, started fresh (``worker_main``, under
cProfile if asked) or forked from ``workers.spawner`` as poold does (``SpawnedWorker``).
"""

from __future__ import annotations

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


def worker_main(spec_json: str, profile: str) -> int:
    """Child process: the worker itself, optionally under cProfile."""
    from workers.main import WorkerSpec, run

    spec = WorkerSpec.from_dict(json.loads(spec_json))
    if not profile:
        return run(spec)
    import cProfile

    # CPU time of the serving thread (where cProfile runs): waits in poll() do not count.
    prof = cProfile.Profile(time.thread_time_ns, 1e-9)
    try:
        return prof.runcall(run, spec)
    finally:
        prof.dump_stats(profile)


def tiny_model(directory: str, shape: list[int], dtype: str, max_batch: int) -> str:
    """A scripted model whose forward costs next to nothing: host work dominates."""
    import torch

    from workers.manifest import write_manifest

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :1000] * 2  # [N, 1000]: a classifier's output shape

    path = os.path.join(directory, "tiny.pt")
    torch.jit.script(Head()).save(path)
    write_manifest(
        os.path.join(directory, "tiny.toml"),
        inputs=[(dtype, tuple(shape))],
        warmup_batch_sizes=sorted({1, max_batch}),
    )
    return path


def resnet_model(directory: str) -> str:
    from benchmodels import make_image_model  # scripts/ is on sys.path (this file's dir)

    return make_image_model(os.path.join(directory, "resnet.pt"), resnet=True, half=True, image=224)


class SpawnedWorker:
    """The worker forked from ``workers.spawner``, as poold starts it (a process that
    imported torch before the fork), behind the few calls ``drive`` makes of a Popen."""

    def __init__(self, spec: dict[str, Any], env: dict[str, str]) -> None:
        from workers.spawner import MessageReader, write_message

        self.spawner = subprocess.Popen(
            [sys.executable, "-m", "workers.spawner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        assert self.spawner.stdin is not None and self.spawner.stdout is not None
        self.out = self.spawner.stdout.fileno()
        self.reader = MessageReader()
        self.returncode: int | None = None
        self._next("hello", 120)
        write_message(self.spawner.stdin.fileno(), {"t": "spawn", "token": 1, "spec": spec})
        self.pid = int(self._next("spawned", 30)["pid"])

    def _pump(self, timeout: float) -> list[dict[str, Any]]:
        """Messages the spawner sent within ``timeout`` (noting the worker's exit)."""
        import select

        got: list[dict[str, Any]] = []
        if select.select([self.out], [], [], timeout)[0]:
            data = os.read(self.out, 65536)
            got = self.reader.feed(data) if data else []
        for msg in got:
            if msg.get("t") == "exited" and msg.get("pid") == getattr(self, "pid", None):
                self.returncode = os.waitstatus_to_exitcode(int(msg["status"]))
        return got

    def _next(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self._pump(0.1):
                if msg.get("t") == kind:
                    return msg
        raise SystemExit(f"spawner: no {kind!r} within {timeout:.0f} s")

    def poll(self) -> int | None:
        if self.returncode is None:
            self._pump(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = time.monotonic() + (timeout or 30.0)
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        """The worker if alive, then the spawner (it exits when its stdin closes)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self.returncode = -9
        if self.spawner.poll() is None:
            assert self.spawner.stdin is not None
            self.spawner.stdin.close()
            self.spawner.wait(30)
