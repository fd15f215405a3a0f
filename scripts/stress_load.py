"""The stress run's load: client threads sending without pause, each answer checked."""

from __future__ import annotations

import array
import threading
import time
from collections.abc import Callable

import numpy as np
import stresskit  # noqa: F401  (puts the project root on sys.path)

from router.client import Client


class Load:
    """Client threads sending without pause; every answer must name a version (and,
    for models this script wrote, carry that version's output)."""

    def __init__(self, endpoint: str, model: str, clients: int, x: np.ndarray,
                 check: Callable[[str, np.ndarray], str | None], timeout_s: float) -> None:
        self.endpoint, self.model, self.x, self.check = endpoint, model, x, check
        self.timeout_s = timeout_s
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.cycle_lat: list[float] = []
        self.all_lat = array.array("d")
        self.failed = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)

    def take(self) -> list[float]:
        """The latencies (ms) of the requests answered since the last call."""
        with self.lock:
            lat, self.cycle_lat = self.cycle_lat, []
        return lat

    def _run(self, idx: int) -> None:
        client = Client(self.endpoint, retries=1, timeout=self.timeout_s)
        try:
            while not self.stop_flag.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.infer(self.model, self.x)
                    problem = self.check(r.version, r.outputs[0] if r.outputs else np.empty(0))
                except Exception as exc:  # PoolError, or anything else: a failed request
                    problem = f"{type(exc).__name__}: {exc}"
                ms = (time.perf_counter() - t0) * 1e3
                with self.lock:
                    if problem:
                        self.failed += 1
                        if len(self.errors) < 20:
                            self.errors.append(f"client {idx}: {problem}")
                    else:
                        self.cycle_lat.append(ms)
                        self.all_lat.append(ms)
        finally:
            client.close()
