"""The soak's traffic: honest clients whose answers are checked, one DEALER that never
reads its replies, and a fuzzer sending mutated requests."""

from __future__ import annotations

import random
from typing import Any

import zmq
from soak_tally import Tally
from stresskit import ModelSet, output_problem  # (stresskit puts the project root on sys.path)

from router.client import Client
from router.client_codec import encode_request
from router.errors import PoolError, RequestTimeout

MODEL = "soak"


def client(tally: Tally, frontend: str, models: ModelSet, timeout_s: float, idx: int) -> None:
    """Requests without pause; every answer checked against the version that claims it."""
    c = Client(frontend, retries=1, timeout=timeout_s)
    try:
        while not tally.stop.is_set():
            try:
                r = c.infer(MODEL, models.x)
                wrong = output_problem(models.refs, r.version, r.outputs[0])
                code = "WRONG" if wrong else "OK"
                if wrong:
                    tally.problem(f"client {idx}: {wrong}")
            except RequestTimeout as exc:
                code = "LOST"
                tally.problem(f"client {idx}: {exc}")
            except PoolError as exc:
                code = exc.code
            tally.answer(code)
    finally:
        c.close()


def dealer(ctx: zmq.Context[Any], frontend: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(frontend)
    return s


def slow_reader(tally: Tally, ctx: zmq.Context[Any], frontend: str, models: ModelSet) -> None:
    """One DEALER that sends requests and never reads a reply."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)  # never read: push back into poold at once
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(frontend)
    frames = [b"", *encode_request(MODEL, (models.x,), 2000)]
    try:
        while not tally.stop.wait(0.002):
            try:
                s.send_multipart(frames, zmq.NOBLOCK)
                tally.note("slow reader sent")
            except zmq.Again:
                pass
    finally:
        s.close(0)


def fuzzer(tally: Tally, ctx: zmq.Context[Any], frontend: str, models: ModelSet) -> None:
    """Mutated requests (``mutate``); answers counted, never required."""
    s = dealer(ctx, frontend)
    good = [bytes(f) for f in encode_request(MODEL, (models.x,), 1000)]
    rng = random.Random(17)
    try:
        while not tally.stop.wait(0.02):
            s.send_multipart([b"", *mutate(good, rng)])
            tally.note("fuzz sent")
            while s.poll(0):
                s.recv_multipart()
                tally.note("fuzz answered")
    finally:
        s.close(0)


def mutate(good: list[bytes], rng: random.Random) -> list[bytes]:
    """One fuzzed request: a valid one with something broken."""
    frames = list(good)
    how = rng.randrange(6)
    if how == 0:  # flip bytes in one frame
        i = rng.randrange(len(frames))
        b = bytearray(frames[i])
        for _ in range(rng.randint(1, 8)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        frames[i] = bytes(b)
    elif how == 1:  # cut a frame short
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif how == 2 and len(frames) > 1:  # drop a frame
        frames.pop(rng.randrange(len(frames)))
    elif how == 3:  # an extra frame of noise
        frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randrange(64)))
    elif how == 4:  # another protocol id
        frames[0] = rng.choice([b"gpu-pool/2", b"", b"GPU-POOL/1", rng.randbytes(10)])
    else:  # noise alone
        frames = [rng.randbytes(rng.randrange(1, 256)) for _ in range(rng.randint(1, 4))]
    return frames
