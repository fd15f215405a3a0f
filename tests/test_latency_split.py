"""Queue time, wait at the worker and compute are three histograms (issue 18), through a
real poold: the worker times its batch's compute and says so in each reply's header, the
router splits the rest of its dispatch-to-reply time off as the wait at the worker."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import zmq
from hostkit import free_port
from modelkit import make_big_mlp
from poolkit import Pool, in_threads, running_pool, wait_for
from prometheus_client.parser import text_string_to_metric_families

from router import protocol as p
from router.client import Client

pytestmark = pytest.mark.slow

HIDDEN = 1024  # 16 layers of 1024 x 1024: a forward of milliseconds on one CPU thread
CLIENTS = 4
PER_CLIENT = 25


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = str(tmp_path_factory.mktemp("split"))
    path = make_big_mlp(os.path.join(d, "models", "big.pt"), HIDDEN, 16, seed=3)
    # One worker taking one request per forward: with four clients it always holds a
    # second request (credit of two batches) while it computes the first.
    model = {"name": "big", "path": path, "version": "1", "devices": ["cpu"], "max_batch": 1}
    port = free_port()
    with running_pool(d, [{**model, "threads": 1}], metrics=f"127.0.0.1:{port}") as pl:
        pl.env["METRICS_PORT"] = str(port)
        yield pl


def sums(pool: Pool) -> dict[str, tuple[float, float]]:
    """(count, sum) of each latency histogram of model big."""
    url = f"http://127.0.0.1:{pool.env['METRICS_PORT']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") == "big" and s.name.endswith(("_count", "_sum")):
                name, _, kind = s.name.rpartition("_")
                out.setdefault(name, [0.0, 0.0])[kind == "sum"] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_a_reply_header_carries_the_workers_wait_and_compute(pool: Pool) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.frontend)
    try:
        x = np.ones((1, HIDDEN), np.float32)
        head = {"model": "big", "inputs": [{"dtype": "float32", "shape": [1, HIDDEN]}]}
        sock.send_multipart([p.PROTOCOL, msgpack.packb(head), x.tobytes()])
        assert sock.poll(10_000)
        reply = msgpack.unpackb(sock.recv_multipart()[1])
    finally:
        sock.close()
    assert reply["ok"] and reply["version"] == "1"
    assert list(reply)[:2] == ["wait_us", "compute_us"]  # where the router reads them
    assert isinstance(reply["wait_us"], int) and reply["wait_us"] >= 0
    assert isinstance(reply["compute_us"], int) and reply["compute_us"] > 0


def test_queue_wait_and_compute_are_separate_histograms(pool: Pool) -> None:
    def client(i: int) -> None:
        with Client(pool.frontend, timeout=60) as c:
            for j in range(PER_CLIENT):
                c.infer("big", np.full((1, HIDDEN), (i + j) % 5, np.float32))

    in_threads(client, CLIENTS)
    n = CLIENTS * PER_CLIENT  # and the one of the test above, if it ran

    def counted() -> dict[str, tuple[float, float]] | None:
        got = sums(pool)
        total = got.get("gpupool_request_duration_seconds", (0, 0))[0]
        return got if total >= n else None

    got = wait_for(counted, 10, "the requests in the histograms")
    queue = got["gpupool_request_queue_seconds"]
    wait = got["gpupool_request_worker_wait_seconds"]
    compute = got["gpupool_request_compute_seconds"]
    total = got["gpupool_request_duration_seconds"]
    # Every answer came from the worker, so each is in all four histograms.
    assert queue[0] == wait[0] == compute[0] == total[0] >= n, got
    # The three parts add up to the whole: nothing is counted twice any more.
    assert queue[1] + wait[1] + compute[1] <= total[1] * 1.001 + 1e-3, got
    # The worker held a second request while it computed each one: a real share of the
    # time at the worker is waiting, which "compute" used to include.
    assert wait[1] > 0.3 * compute[1] > 0, got
    assert queue[1] > 0, got  # and four clients against a credit of two queue in the router
